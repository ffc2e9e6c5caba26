"""The DeNS EquiformerV2 model: parity with fairchem, encoding, inference, rotations."""

from __future__ import annotations

import math

import pytest
import torch

from fairchem_dens.encoding import force_encoding_coefficients
from fairchem_dens.testing import (
    dens_mode_batch,
    TINY_EQV2_BACKBONE,
    build_model,
    eqv2_dens_model_config,
    forward_seeded,
    rotate_batch,
    rotation_matrix,
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
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (key, (a[key] - b[key]).abs().max())
    # the modes really differ from each other
    if mode != "s2ef":
        with torch.no_grad():
            s2ef = forward_seeded(ours, as_mode(fixture_batch, "s2ef"))
        assert not torch.allclose(a["forces"], s2ef["forces"], atol=1e-4)


def test_force_encoding_matches_spec():
    forces = torch.tensor([[0.3, -1.2, 0.5], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    coefficients = force_encoding_coefficients(forces, lmax=3)
    assert coefficients.shape == (3, 16)
    norms = forces.norm(dim=-1)
    assert torch.allclose(coefficients[:, 0], norms / math.sqrt(3.0))  # l = 0
    assert torch.allclose(coefficients[:, 1:4], forces, atol=1e-6)  # l = 1 is F itself
    assert torch.all(coefficients[1] == 0)  # zero force, zero encoding
    for l in range(4):  # component normalisation: |Y_l|^2 = 2l+1, times |F|^2/3
        block = coefficients[2, l * l : (l + 1) ** 2]
        assert math.isclose(block.pow(2).sum().item(), (2 * l + 1) * 4.0 / 3.0, rel_tol=1e-5)
    masked = force_encoding_coefficients(forces, 3, mask=torch.tensor([True, True, False]))
    assert torch.all(masked[2] == 0) and torch.equal(masked[0], coefficients[0])


def test_denoising_off_equals_plain_equiformer_v2(fixture_batch):
    """Without DeNS the model is fairchem's EquiformerV2 with the encoding bias folded in."""
    ours = build_model(eqv2_dens_model_config("ours"), seed=0).eval()
    plain = build_model(eqv2_dens_model_config("plain"), seed=3).eval()
    with torch.no_grad():
        ours.backbone.force_embedding.bias.normal_()
    mapped = {}
    for key, value in ours.state_dict().items():
        if "force_embedding" in key or "denoising_pos_block" in key:
            continue
        key = key.replace("output_heads.energy.scalar_block", "output_heads.energy.energy_block")
        key = key.replace("output_heads.forces.vector_block", "output_heads.forces.force_block")
        mapped[key] = value
    # The always-added bias on l=0 is a constant shift of every atom's type embedding.
    mapped["backbone.sphere_embedding.weight"] = (
        mapped["backbone.sphere_embedding.weight"] + ours.backbone.force_embedding.bias
    )
    plain.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        a = forward_seeded(ours, fixture_batch)
        b = forward_seeded(plain, fixture_batch)
    assert torch.allclose(a["energy"], b["energy"], atol=1e-5)
    assert torch.allclose(a["forces"], b["forces"], atol=1e-5)
    # ... and the bias does matter: without folding it in, outputs differ.
    mapped["backbone.sphere_embedding.weight"] -= ours.backbone.force_embedding.bias
    plain.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        c = forward_seeded(plain, fixture_batch)
    assert not torch.allclose(a["forces"], c["forces"], atol=1e-5)


def test_only_the_heads_that_are_used_run(fixture_batch):
    """S2EF batches (training or inference) skip the noise block, fully corrupted ones the force block."""
    model = build_model(eqv2_dens_model_config("ours"))
    head = model.output_heads["forces"]
    calls = {"noise": 0, "force": 0}
    head.denoising_pos_block.register_forward_hook(lambda *a: calls.__setitem__("noise", calls["noise"] + 1))
    head.vector_block.register_forward_hook(lambda *a: calls.__setitem__("force", calls["force"] + 1))
    expected = {("s2ef", True): (1, 0), ("s2ef", False): (1, 0), ("full", True): (0, 1), ("full", False): (0, 1),
                ("partial", True): (1, 1), ("partial", False): (1, 1)}
    outputs = {}
    for (mode, training), (force_calls, noise_calls) in expected.items():
        calls.update(noise=0, force=0)
        model.train(training)
        with torch.no_grad():
            outputs[mode, training] = forward_seeded(model, as_mode(fixture_batch, mode))
        assert (calls["force"], calls["noise"]) == (force_calls, noise_calls), (mode, training)
    for mode in MODES:  # training and inference give the same outputs (no dropout in the tiny model)
        torch.testing.assert_close(outputs[mode, True]["forces"], outputs[mode, False]["forces"], atol=1e-6, rtol=0)
        torch.testing.assert_close(outputs[mode, True]["energy"], outputs[mode, False]["energy"], atol=1e-6, rtol=0)


def test_training_mode_gives_every_parameter_a_gradient(fixture_batch):
    model = build_model(eqv2_dens_model_config("ours")).train()
    for mode in MODES:
        model.zero_grad()
        out = forward_seeded(model, as_mode(fixture_batch, mode))
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (mode, missing[:5])  # DDP needs a gradient for every parameter
        unused = {"s2ef": "denoising_pos_block", "full": "vector_block"}.get(mode)
        if unused:  # the skipped block gets an exact zero, as the peers' 0 * output gives
            block = getattr(model.output_heads["forces"], unused)
            assert all(torch.all(p.grad == 0) for p in block.parameters())


def test_disabled_force_encoding_ignores_forces(fixture_batch):
    model = build_model(eqv2_dens_model_config("ours", use_force_encoding=False)).eval()
    batch = as_mode(fixture_batch, "full")
    other = batch.clone()
    other.forces = 5 * torch.randn_like(batch.forces)
    with torch.no_grad():
        assert torch.allclose(forward_seeded(model, batch)["forces"], forward_seeded(model, other)["forces"])


def test_sigma_encoding_uses_sigmas(fixture_batch):
    model = build_model(eqv2_dens_model_config("ours", use_noise_schedule_sigma_encoding=True)).eval()
    theirs = build_model(eqv2_dens_model_config("fairchem", use_noise_schedule_sigma_encoding=True)).eval()
    theirs.load_state_dict(model.state_dict())
    batch = as_mode(fixture_batch, "partial")
    batch.sigmas = torch.full((batch.pos.shape[0], 1), 0.3)
    with torch.no_grad():
        a, b = forward_seeded(model, batch), forward_seeded(theirs, batch)
        assert torch.allclose(a["forces"], b["forces"], atol=1e-5)
        batch.sigmas = batch.sigmas * 3
        assert not torch.allclose(forward_seeded(model, batch)["forces"], a["forces"], atol=1e-6)
    del batch.sigmas
    with pytest.raises(ValueError, match="sigmas"), torch.no_grad():
        model(batch)


@pytest.mark.parametrize("mode", MODES)
def test_rotation_equivariance(fixture_batch, mode):
    # An uncapped neighbour list: ties at a max_neighbors cut would make the graph itself
    # rotation dependent (the fixture's slabs sit on ideal lattice sites).
    backbone = {**TINY_EQV2_BACKBONE, "max_neighbors": 1000}
    model = build_model(eqv2_dens_model_config("ours", backbone=backbone)).eval()
    batch = as_mode(fixture_batch, mode)
    rotation = rotation_matrix(3)
    rotated = rotate_batch(batch, rotation)
    with torch.no_grad():
        out = forward_seeded(model, batch, seed=7)
        out_rot = forward_seeded(model, rotated, seed=11)
    energy_scale = out["energy"].abs().max()
    # measured (seeds 3, 5, 8): energy <= 6e-6 relative, forces <= 1.8e-3 of max|F|
    assert (out["energy"] - out_rot["energy"]).abs().max() <= 5e-5 * energy_scale
    expected = out["forces"] @ rotation.T
    scale = out["forces"].abs().max()
    # S2-grid activations make EquiformerV2 equivariant up to a small discretisation error.
    assert (expected - out_rot["forces"]).abs().max() <= 5e-3 * scale
    # rotating the positions without rotating the encoded forces breaks equivariance
    if mode != "s2ef":
        wrong = rotated.clone()
        wrong.forces = batch.forces
        with torch.no_grad():
            out_wrong = forward_seeded(model, wrong, seed=11)
        assert (expected - out_wrong["forces"]).abs().max() > 4 * 5e-3 * scale
