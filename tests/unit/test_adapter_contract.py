"""Each backbone adapter declares what the trainer's model check reads, and its classes match it.

The model check (``trainers/guards.py``) knows a backbone only through its adapter: the noise
block's attribute names, the gradient-force heads fairchem registers, and the
``dens_conservative`` flag of conservative DeNS heads. A declaration that drifts from the
classes would let a model through the check or refuse a good one; these tests tie them.
"""

from __future__ import annotations

import importlib

import pytest

from fairchem_dens.models.adapters import (
    adapter,
    adapters,
    gradient_force_heads,
    is_dens_conservative,
    noise_blocks,
)
from fairchem_dens.testing import build_model, eqv2_dens_model_config, escn_dens_model_config, esen_dens_model_config
from fairchem_dens.trainers.guards import check_model

CONFIGS = {"equiformer_v2": eqv2_dens_model_config, "escn": escn_dens_model_config, "esen": esen_dens_model_config}


def _class(dotted: str) -> type:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_adapter_has_a_model_here():
    assert {candidate.family for candidate in adapters()} == set(CONFIGS)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_direct_force_head_has_a_noise_block_its_adapter_declares(family):
    candidate = adapter(family)
    model = build_model(CONFIGS[family]())
    head = model.output_heads["forces"]
    assert type(head) is _class(candidate.force_head)
    assert any(hasattr(head, name) for name in candidate.noise_blocks), (
        f"{candidate.force_head} has none of {candidate.noise_blocks}"
    )
    assert not is_dens_conservative(head)
    check_model(model)  # the check reads the same declarations and lets the model through


def test_a_conservative_head_says_so_and_has_a_declared_noise_block():
    for candidate in adapters():
        if candidate.conservative_head is not None:
            assert is_dens_conservative(_class(candidate.conservative_head)), candidate.conservative_head
    model = build_model(esen_dens_model_config("ours_conservative"))
    head = model.output_heads["energy"]
    assert type(head) is _class(adapter("esen").conservative_head)
    assert is_dens_conservative(head)
    assert any(hasattr(head, name) for name in adapter("esen").noise_blocks)
    check_model(model)


def test_gradient_force_heads_are_fairchem_registry_names():
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    setup_imports()  # registers every fairchem model, as a fairchem run does
    registered = registry.mapping["model_name_mapping"]
    assert [name for name in gradient_force_heads() if name not in registered] == []


def test_the_noise_blocks_are_listed_once_in_adapter_order():
    # the model check's message lists them in this order
    assert noise_blocks() == ("denoising_pos_block", "denoising_linear", "denoising_block")
