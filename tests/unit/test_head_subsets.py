"""Head blocks computed on the atoms whose output is used equal the blocks computed on every atom."""

from __future__ import annotations

import pytest
import torch

from fairchem_dens.core.batch import corrupted_atoms
from fairchem_dens.testing import (
    TINY_EQV2_BACKBONE,
    TINY_ESCN_BACKBONE,
    build_model,
    corrupt_like_trainer,
    eqv2_dens_model_config,
    escn_dens_model_config,
)
from fairchem_dens.testing.tolerances import GRADIENT_ULPS, REORDERED_ULPS, assert_ulps, bias_gradient_scales

CASES = {  # the trainer's own corruption settings; the fixture batch has fixed bottom layers
    "s2ef": {"enabled": False},
    "full": {"corrupt_ratio": None},
    "partial": {"corrupt_ratio": 0.5},
    "relaxation_only": {"corrupt_ratio": 0.5, "relaxation_only": True},
}
MODELS = {
    "eqv2": lambda: eqv2_dens_model_config("ours", backbone={**TINY_EQV2_BACKBONE, "max_neighbors": 20}),
    "escn": lambda: escn_dens_model_config("ours", backbone={**TINY_ESCN_BACKBONE, "max_neighbors": 20}),
}


def corrupted(batch, case):
    if case == "relaxation_only":
        batch = batch.clone()
        batch.md = torch.tensor([0, 1, 0, 1])
    return corrupt_like_trainer(batch, step=3, **CASES[case])


def every_atom(model, batch):
    """Both blocks on every atom, combined per atom: what the peers compute."""
    emb = model.backbone(batch)
    head = model.output_heads["forces"]
    if hasattr(head, "vector_block"):
        force = head._vectors(head.vector_block, emb)
        noise = head._vectors(head.denoising_pos_block, emb)
    else:
        force = head.force_block(emb["sphere_values"], emb["sphere_points"])
        noise = head.denoising_pos_block(emb["sphere_values"], emb["sphere_points"])
    return torch.where(corrupted_atoms(batch).view(-1, 1), noise, force)


def grads(model, forces):
    model.zero_grad(set_to_none=True)
    (forces.pow(2).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_outputs_and_gradients_equal_every_atom_blocks(fixture_batch, family, case):
    model = build_model(MODELS[family]()).train()
    batch = corrupted(fixture_batch, case)
    if case == "partial":
        mask = batch.noise_mask
        assert mask.any() and (~mask & (batch.fixed == 0)).any()  # both blocks have atoms
    torch.manual_seed(7)
    ours = model(batch)["forces"]
    ours_grads = grads(model, ours)
    torch.manual_seed(7)
    with bias_gradient_scales(model) as bias_scales:  # hooks on the forward, filled by the backward
        reference = every_atom(model, batch)
        reference_grads = grads(model, reference)
    assert_ulps(ours, reference, REORDERED_ULPS, what="forces")
    # parameters of a block the batch does not use get a zero gradient (DDP sees every one)
    assert set(ours_grads) >= set(reference_grads)
    for name, grad in reference_grads.items():
        scale = max(float(grad.abs().max()), bias_scales.get(name, 0.0))
        assert_ulps(ours_grads[name], grad, GRADIENT_ULPS, scale=scale, what=name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("output_heads.energy")}
    assert set(ours_grads) == trainable
