"""Checkpoints of the original DeNS implementation as fairchem 1.10 checkpoints of ours.

The original implementation (``equiformer_v2_dens`` / ``escn_dens``) saved a monolithic
model: keys ``force_block.*``, ``energy_block.*``, ``denoising_pos_block.*`` and
everything else at the top level, the short model name, ``model_attributes`` and legacy
``{mean, std}`` normalizers. :func:`convert_original_checkpoint` renames the weights by
the rules of each backbone's adapter (``BackboneAdapter.original_prefixes``) and writes a
hydra model config naming our classes.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

import torch

from fairchem_dens.models.adapters import adapter
from fairchem_dens.models.checkpoints import (
    CheckpointMismatchError,
    checkpoint_family,
    explain_mismatch,
    model_from_config,
    strip_ddp_prefix,
)

__all__ = ["original_model_config", "convert_original_checkpoint"]

# model_attributes of the original classes that fairchem 1.10's backbones do not take.
_DROPPED = {"num_atoms", "bond_feat_dim", "num_targets", "use_tp_reparam", "use_denoising_energy"}


def original_model_config(family: str, model_attributes: dict[str, Any]) -> dict[str, Any]:
    """The hydra model config of our classes for an original ``model_attributes``."""
    found = adapter(family)
    if not found.original_prefixes:
        raise ValueError(f"the original DeNS implementation had no {found.label} model")
    kwargs = {k: v for k, v in model_attributes.items() if k not in _DROPPED}
    for key, value in found.original_defaults.items():
        kwargs.setdefault(key, value)
    kwargs["model"] = found.backbone
    energy_head: dict[str, Any] = {"module": found.energy_head}
    if model_attributes.get("use_denoising_energy") is False:
        energy_head["use_denoising"] = False
    return {
        "name": "hydra",
        "pass_through_head_outputs": True,
        "otf_graph": bool(kwargs.get("otf_graph", True)),
        "backbone": kwargs,
        "heads": {"energy": energy_head, "forces": {"module": found.force_head}},
    }


def _rename_original(key: str, family: str) -> str:
    for old, new in adapter(family).original_prefixes:
        if key.startswith(old):
            return new + key[len(old) :]
    return "backbone." + key


def _legacy_normalizers(normalizers: dict[str, Any]) -> dict[str, Any]:
    converted = {}
    for name, state in normalizers.items():
        if isinstance(state, dict) and "std" in state:
            state = {"mean": torch.as_tensor(state["mean"]).float(), "rmsd": torch.as_tensor(state["std"]).float()}
        converted[name] = state
    return converted


def convert_original_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of the original implementation as a fairchem 1.10 checkpoint of ours.

    Renames the weights (3 prefix rules, ``module.`` stripped), replaces the short
    model name and ``model_attributes`` by a hydra model config naming our classes,
    converts legacy normalizers, and reorders the EMA's parameter list to our
    model's order. The optimizer and scheduler states are dropped (their parameter
    order is the original model's); ``epoch`` and ``step`` are kept.
    """
    config = copy.deepcopy(checkpoint.get("config", {}))
    layout, family = checkpoint_family(checkpoint)
    if layout != "original":
        raise CheckpointMismatchError("the checkpoint is already in fairchem 1.10 (hydra) layout")
    name = config.get("model")
    if name not in (None, "equiformer_v2_dens", "escn_dens"):
        logging.warning("converting a checkpoint of model %r as an original DeNS %s", name, family)
    model_config = original_model_config(family, config.get("model_attributes", {}))
    original_state = strip_ddp_prefix(checkpoint["state_dict"])
    state_dict = OrderedDict((_rename_original(k, family), v) for k, v in original_state.items())

    model = model_from_config(model_config)
    problems = explain_mismatch(model.state_dict(), state_dict)
    if problems:
        raise CheckpointMismatchError("the original checkpoint does not fit its own config:\n" + problems)

    converted: dict[str, Any] = {
        key: value
        for key, value in checkpoint.items()
        if key not in ("state_dict", "optimizer", "scheduler", "ema", "config", "normalizers", "amp")
    }
    converted["state_dict"] = state_dict
    converted["normalizers"] = _legacy_normalizers(checkpoint.get("normalizers", {}))
    converted["amp"] = None
    ema = checkpoint.get("ema")
    if ema is not None:
        converted["ema"] = _reorder_ema(ema, original_state, family, model)
    config.pop("model_attributes", None)
    config["model"] = model_config
    config["trainer"] = "forces"
    config["converted_from"] = {"model": name, "implementation": "original DeNS (atomicarchitects/DeNS)"}
    converted["config"] = config
    return converted


def _reorder_ema(ema: dict[str, Any], original_state: OrderedDict, family: str, model: torch.nn.Module):
    """The EMA's shadow parameters, from the original model's order to ours."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # The original state dict lists parameters in registration order, as named_parameters() does.
    original_order = [k for k in original_state if _rename_original(k, family) in trainable]
    shadow = list(ema["shadow_params"])
    if len(shadow) != len(original_order):
        raise CheckpointMismatchError(f"the EMA holds {len(shadow)} parameters but the model has {len(original_order)}")
    by_name = {_rename_original(k, family): t for k, t in zip(original_order, shadow)}
    ours = [name for name, p in model.named_parameters() if p.requires_grad]
    return {**ema, "shadow_params": [by_name[name] for name in ours], "collected_params": []}
