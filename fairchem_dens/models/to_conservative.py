"""Step 2 of the two-step eSEN recipe: a direct DeNS checkpoint as fairchem's conservative eSEN."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch

from fairchem_dens.core.modules import DENS_BACKBONE_KEYWORDS
from fairchem_dens.core.roles import GRADIENT_OUTPUTS
from fairchem_dens.models import esen
from fairchem_dens.models.adapters import adapter
from fairchem_dens.models.checkpoints import (
    CheckpointMismatchError,
    checkpoint_family,
    explain_mismatch,
    model_from_config,
    strip_ddp_prefix,
)

__all__ = ["conservative_finetune_checkpoint"]


def conservative_finetune_checkpoint(checkpoint: dict[str, Any], use_ema: bool = True) -> dict[str, Any]:
    """Step 2 of the two-step eSEN recipe: a direct DeNS checkpoint as fairchem's conservative eSEN.

    The published eSEN and EquiformerV3 recipes pre-train a direct model with DeNS, then
    fine-tune it with energy-gradient forces (and stress) without DeNS. This keeps the
    backbone and the energy head (with the EMA weights, as fairchem evaluates them),
    drops the direct force/noise heads and folds the force encoding into the atom
    embedding, giving a checkpoint of fairchem's own ``eSEN_Backbone`` + ``MLP_EFS_Head``
    whose energy equals the direct model's. Training state (optimizer, scheduler,
    EMA, epoch, step) is dropped so ``fairchem --mode train --checkpoint`` starts fresh;
    the energy normalizer and the element references are kept, and the force and
    stress normalizers become mean 0, rmsd = the energy's (1 without one): gradients of
    the normalised energy come out in those units (``check_gradient_normalizers``).
    fairchem loads them over whatever the fine-tuning config fits.

    Args:
        checkpoint: a hydra checkpoint of our DeNS eSEN (any heads).
        use_ema: take the EMA's weights when the checkpoint has them.
    """
    layout, family = checkpoint_family(checkpoint)
    if family != "esen" or layout != "hydra":
        raise CheckpointMismatchError(
            f"to-conservative converts eSEN checkpoints (fairchem-dens or fairchem DeNS eSEN); this one holds "
            f"{adapter(family).label}, for which fairchem 1.10 has no conservative head"
        )
    if "backbone.force_embedding.bias" not in strip_ddp_prefix(checkpoint["state_dict"]):
        raise CheckpointMismatchError("the checkpoint's eSEN has no force encoding: it is already a plain eSEN")
    config = copy.deepcopy(checkpoint.get("config", {}))
    backbone = {k: v for k, v in config["model"]["backbone"].items() if k not in DENS_BACKBONE_KEYWORDS}
    backbone.update(model=esen.PLAIN_BACKBONE, regress_stress=True)
    model_config = {**config["model"], "backbone": backbone, "heads": {"energy": {"module": esen.PLAIN_EFS_HEAD}}}
    model_config.pop("finetune_config", None)
    state_dict = esen.plain_esen_state_dict(_weights(checkpoint, use_ema))
    problems = explain_mismatch(model_from_config(model_config).state_dict(), state_dict)
    if problems:
        raise CheckpointMismatchError("the converted weights do not fit fairchem's eSEN:\n" + problems)
    normalizers = {k: v for k, v in checkpoint.get("normalizers", {}).items() if k == "energy"}
    energy_rmsd = normalizers["energy"]["rmsd"].clone() if "energy" in normalizers else torch.tensor(1.0)
    for name in GRADIENT_OUTPUTS:
        normalizers[name] = {"mean": torch.zeros_like(energy_rmsd), "rmsd": energy_rmsd.clone()}
    config["model"] = model_config
    config["trainer"] = "mlip_trainer"
    config["optim"] = {
        k: v
        for k, v in config.get("optim", {}).items()
        if k not in ("use_denoising_pos", "denoising_pos_params", "denoising_pos_coefficient")
    }
    config["converted_from"] = {"stage": "direct DeNS pre-training", "ema": bool(use_ema and checkpoint.get("ema"))}
    return {
        "state_dict": state_dict,
        "normalizers": normalizers,
        "elementrefs": checkpoint.get("elementrefs", {}),
        "config": config,
        "epoch": 0,
        "step": 0,
        # A new run: no primary metric, so fairchem starts its best value afresh (1e9 for an
        # MAE). Keeping step 1's metric name with a None best made fairchem compare the first
        # validation against None and crash (it did for `checkpoint.pt`, which stores the name).
        "best_val_metric": None,
        "primary_metric": None,
        "amp": None,
    }


def _weights(checkpoint: dict[str, Any], use_ema: bool) -> OrderedDict:
    """The checkpoint's weights, with the EMA's shadow parameters put in when asked and present."""
    state = strip_ddp_prefix(checkpoint["state_dict"])
    ema = checkpoint.get("ema")
    if not use_ema or not ema or not ema.get("shadow_params"):
        return state
    model = model_from_config(checkpoint["config"]["model"])
    model.load_state_dict(state, strict=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if len(trainable) != len(ema["shadow_params"]):
        raise CheckpointMismatchError(
            f"the EMA holds {len(ema['shadow_params'])} parameters but the model has {len(trainable)}"
        )
    with torch.no_grad():
        for parameter, shadow in zip(trainable, ema["shadow_params"]):
            parameter.copy_(shadow)
    return OrderedDict(model.state_dict())
