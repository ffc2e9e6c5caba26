"""The DeNS eSCN model beyond the shared backbone suite (tests/integration/test_backbones.py): the encoding switch."""

from __future__ import annotations

import torch

from fairchem_dens.testing import (
    build_model,
    escn_dens_model_config,
    forward_seeded,
)
from fairchem_dens.testing import dens_mode_batch as as_mode
from fairchem_dens.testing.tolerances import MUST_DIFFER_ULPS, f32_tol


def test_force_encoding_switch(fixture_batch):
    batch = as_mode(fixture_batch, "full")
    other = batch.clone()
    other.forces = 3 * torch.randn_like(batch.forces)
    for use, differs in ((True, True), (False, False)):
        model = build_model(escn_dens_model_config("ours", use_force_encoding=use)).eval()
        with torch.no_grad():
            model.backbone.force_embedding.weight.normal_()
            a, b = forward_seeded(model, batch), forward_seeded(model, other)
        same = torch.allclose(a["forces"], b["forces"], rtol=0, atol=f32_tol(a["forces"].abs().max(), MUST_DIFFER_ULPS))
        assert (not same) == differs
