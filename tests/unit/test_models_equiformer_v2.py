"""The DeNS EquiformerV2 model beyond the shared backbone suite (tests/integration/test_backbones.py): parity with fairchem's port, the encoding."""

from __future__ import annotations

import math

import pytest
import torch

from fairchem_dens.core.encoding import force_encoding_coefficients
from fairchem_dens.testing import (
    build_model,
    dens_mode_batch,
    eqv2_dens_model_config,
    forward_seeded,
)
from fairchem_dens.testing.tolerances import (
    ELEMENTWISE_ULPS,
    EPS32,
    MUST_DIFFER_ULPS,
    REORDERED_ULPS,
    assert_ulps,
    f32_tol,
)

MODES = ("s2ef", "full", "partial")


as_mode = dens_mode_batch  # short name used throughout these tests


@pytest.fixture(scope="module")
def ours_and_fairchem():
    ours = build_model(eqv2_dens_model_config("ours"), seed=0)
    theirs = build_model(eqv2_dens_model_config("fairchem"), seed=1)
    # Random, non-zero DeNS weights so the force encoding and its bias matter.
    with torch.no_grad():
        ours.backbone.force_embedding.bias.normal_()
        ours.backbone.force_embedding.weight.normal_()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def test_state_dict_names_equal_fairchems_port(ours_and_fairchem):
    ours, theirs = ours_and_fairchem
    ours_keys, their_keys = ours.state_dict().keys(), theirs.state_dict().keys()
    assert list(ours_keys) == list(their_keys)
    assert "backbone.force_embedding.weight" in ours_keys
    assert any(k.startswith("output_heads.forces.denoising_pos_block.") for k in ours_keys)
    assert any(k.startswith("output_heads.energy.scalar_block.") for k in ours_keys)
    # and back: fairchem's weights load into ours
    fresh = build_model(eqv2_dens_model_config("ours"), seed=5)
    assert not fresh.load_state_dict(theirs.state_dict(), strict=True).missing_keys


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [False, True])
def test_outputs_equal_fairchems_dens_port(ours_and_fairchem, fixture_batch, mode, training):
    ours, theirs = ours_and_fairchem
    batch = as_mode(fixture_batch, mode)
    ours.train(training)
    theirs.train(training)
    with torch.no_grad():
        a = forward_seeded(ours, batch)
        b = forward_seeded(theirs, batch)
    ours.eval(), theirs.eval()
    for key in ("energy", "forces"):
        assert a[key].shape == b[key].shape
        assert_ulps(a[key], b[key], REORDERED_ULPS, what=key)
    # the modes really differ from each other
    if mode != "s2ef":
        with torch.no_grad():
            s2ef = forward_seeded(ours, as_mode(fixture_batch, "s2ef"))
        assert not torch.allclose(
            a["forces"], s2ef["forces"], rtol=0, atol=f32_tol(s2ef["forces"].abs().max(), MUST_DIFFER_ULPS)
        )


def test_force_encoding_matches_spec():
    forces = torch.tensor([[0.3, -1.2, 0.5], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    coefficients = force_encoding_coefficients(forces, lmax=3)
    assert coefficients.shape == (3, 16)
    norms = forces.norm(dim=-1)
    assert_ulps(coefficients[:, 0], norms / math.sqrt(3.0), ELEMENTWISE_ULPS, what="l = 0")
    assert_ulps(coefficients[:, 1:4], forces, ELEMENTWISE_ULPS, what="l = 1 is F itself")
    assert torch.all(coefficients[1] == 0)  # zero force, zero encoding
    for degree in range(4):  # component normalisation: |Y_l|^2 = 2l+1, times |F|^2/3
        block = coefficients[2, degree * degree : (degree + 1) ** 2]
        assert math.isclose(block.pow(2).sum().item(), (2 * degree + 1) * 4.0 / 3.0, rel_tol=ELEMENTWISE_ULPS * EPS32)
    masked = force_encoding_coefficients(forces, 3, mask=torch.tensor([True, True, False]))
    assert torch.all(masked[2] == 0) and torch.equal(masked[0], coefficients[0])


def test_disabled_force_encoding_ignores_forces(fixture_batch):
    model = build_model(eqv2_dens_model_config("ours", use_force_encoding=False)).eval()
    batch = as_mode(fixture_batch, "full")
    other = batch.clone()
    other.forces = 5 * torch.randn_like(batch.forces)
    with torch.no_grad():
        assert torch.equal(forward_seeded(model, batch)["forces"], forward_seeded(model, other)["forces"])


def test_sigma_encoding_uses_sigmas(fixture_batch):
    model = build_model(eqv2_dens_model_config("ours", use_noise_schedule_sigma_encoding=True)).eval()
    theirs = build_model(eqv2_dens_model_config("fairchem", use_noise_schedule_sigma_encoding=True)).eval()
    theirs.load_state_dict(model.state_dict())
    batch = as_mode(fixture_batch, "partial")
    batch.sigmas = torch.full((batch.pos.shape[0], 1), 0.3)
    with torch.no_grad():
        a, b = forward_seeded(model, batch), forward_seeded(theirs, batch)
        assert_ulps(a["forces"], b["forces"], REORDERED_ULPS, what="forces")
        batch.sigmas = batch.sigmas * 3
        assert not torch.allclose(
            forward_seeded(model, batch)["forces"],
            a["forces"],
            rtol=0,
            atol=f32_tol(a["forces"].abs().max(), MUST_DIFFER_ULPS),
        )
    del batch.sigmas
    with pytest.raises(ValueError, match="sigmas"), torch.no_grad():
        model(batch)
