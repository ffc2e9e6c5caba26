"""DeNS on a CUDA GPU (fairchem 1.10): a DeNS batch gives the CPU's outputs, and a bf16 AMP step trains.

Marked ``cuda``: skipped without a GPU (tests/conftest.py), run where one is.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fairchem_dens.core.batch import corrupted_atoms
from fairchem_dens.testing import build_model, corrupt_like_trainer, esen_dens_model_config, forward_seeded
from fairchem_dens.testing.tolerances import REORDERED_ULPS, assert_ulps

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("noise_head", ["linear", "block"])
@pytest.mark.parametrize("flavour", ["ours", "ours_conservative"])
def test_a_dens_batch_gives_the_cpus_outputs_on_cuda(fixture_batch, flavour, noise_head):
    model = build_model(esen_dens_model_config(flavour, noise_head=noise_head)).eval()
    batch = corrupt_like_trainer(fixture_batch, corrupt_ratio=0.5, std=0.05)
    cpu = forward_seeded(model, batch)
    gpu = forward_seeded(copy.deepcopy(model).cuda(), batch.cuda())
    # the same float32 math; GPU kernels sum in other orders (TF32 off: torch's default for matmul)
    for name in ("energy", "forces"):
        assert_ulps(gpu[name].detach().cpu(), cpu[name].detach(), REORDERED_ULPS, what=name)


@pytest.mark.parametrize("conservative", [False, True])
def test_a_bf16_amp_step_of_the_block_model_is_finite_wherever_fairchems_plain_model_is(fixture_batch, conservative):
    # fairchem's own conservative eSEN is not finite under bf16 autocast on every device (its
    # gradient forces): the DeNS model is held to what the plain one does with the same weights
    suffix = "_conservative" if conservative else ""
    plain = build_model(esen_dens_model_config("plain" + suffix)).cuda().train()
    ours = build_model(esen_dens_model_config("ours" + suffix, noise_head="block")).cuda().train()
    ours.load_state_dict(plain.state_dict(), strict=False)
    batch = corrupt_like_trainer(fixture_batch, corrupt_ratio=0.5, std=0.05).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, out = plain(batch.clone()), ours(batch.clone())
    for name, value in expected.items():
        if bool(torch.isfinite(value).all()):
            assert bool(torch.isfinite(out[name]).all()), name
    if all(bool(torch.isfinite(value).all()) for value in expected.values()):
        (out["energy"].float().square().sum() + out["forces"].float().square().sum()).backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in ours.parameters() if p.grad is not None)
        assert bool(torch.isfinite(out["forces"][corrupted_atoms(batch)]).all())
