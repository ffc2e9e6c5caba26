"""DeNS eSCN-MD on a CUDA GPU (fairchem 2): a DeNS batch gives the CPU's outputs, and a bf16 AMP step trains.

Marked ``cuda``: skipped without a GPU (tests/conftest.py), run where one is.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fairchem_dens.testing.tolerances import REORDERED_ULPS, assert_ulps

from fc2_helpers import build, dens_batch, outputs, run

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("noise_head", ["linear", "block"])
@pytest.mark.parametrize("conservative", [False, True])
def test_a_dens_batch_gives_the_cpus_outputs_on_cuda(conservative, noise_head):
    model = build(True, conservative=conservative, noise_head=noise_head).eval()
    data = dens_batch()
    cpu = outputs(run(model, copy.deepcopy(data)))
    gpu = outputs(run(copy.deepcopy(model).cuda(), copy.deepcopy(data).to("cuda")))
    # the same float32 math; GPU kernels sum in other orders
    for name in ("energy", "forces"):
        assert_ulps(gpu[name].detach().cpu(), cpu[name].detach(), REORDERED_ULPS, what=name)


@pytest.mark.parametrize("conservative", [False, True])
def test_a_bf16_amp_training_step_with_the_block_noise_head_is_finite(conservative):
    model = build(True, conservative=conservative, noise_head="block").cuda().train()
    data = dens_batch().to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = outputs(model(data))
    (out["energy"].float().sum() + out["forces"].float().square().sum()).backward()
    assert bool(torch.isfinite(out["forces"]).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
