"""A DeNS model that starts from a fairchem-2 inference checkpoint: fine-tuning with DeNS.

fairchem's own ``initialize_finetuning_model`` loads the checkpoint's model strictly, so it
cannot add the force encoding and the noise head, and with new heads it discards every
pretrained head. :func:`dens_finetuning_model` builds the checkpoint's model with the
given backbone changes (the DeNS backbone class, ``direct_forces: False`` for the
conservative step of the direct-then-conservative recipe) and heads, then copies every
weight of the checkpoint whose name and shape the new model shares: the whole backbone
(refused otherwise) and matching head weights (the energy MLP of a direct model goes into
the conservative head). The DeNS parameters start fresh. Use it as the unit's model::

    model:
      _target_: fairchem_dens.fairchem2.finetune.dens_finetuning_model
      checkpoint_location: /path/to/inference_ckpt.pt    # ours (plain), or a released UMA / eSEN file
      backbone: {model: fairchem_dens.fairchem2.models.DeNSeSCNMDBackbone, otf_graph: True}
      heads: {efs: {module: fairchem_dens.fairchem2.models.DeNSMLPEFSHead}}

A released UMA checkpoint needs ``model: fairchem_dens.fairchem2.models.DeNSeSCNMDMoeBackbone``
(the class its config names, with DeNS); ``fairchem.core.calculate.pretrained_mlip.
pretrained_checkpoint_path_from_name`` gives the path of a downloaded one.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import torch
from fairchem.core.models.uma.compat import apply_uma_compat_fixups
from omegaconf import DictConfig, OmegaConf

from fairchem_dens.core.errors import DeNSSetupError

__all__ = ["dens_finetuning_model"]

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def dens_finetuning_model(
    checkpoint_location: str,
    heads: dict,
    backbone: dict | None = None,
    **model_overrides: Any,
) -> torch.nn.Module:
    """The checkpoint's model with ``backbone`` changes, new ``heads`` and the checkpoint's weights.

    Args:
        checkpoint_location: a fairchem-2 ``inference_ckpt.pt``.
        heads: the heads of the new model (HydraModel's ``heads``).
        backbone: keys that replace the checkpoint's backbone config (``model``, ``otf_graph``, ...).
        **model_overrides: other HydraModel keywords (``pass_through_head_outputs``, ...).

    Raises:
        DeNSSetupError: a backbone weight of the new model (other than DeNS's) is not in the
            checkpoint, or has another shape there; or a head of the new model holds a weight
            of another shape than the checkpoint's head of the same name.
    """
    checkpoint = torch.load(checkpoint_location, map_location="cpu", weights_only=False)
    apply_uma_compat_fixups(checkpoint, checkpoint_location=checkpoint_location)
    config = dict(_plain(checkpoint.model_config))
    config["backbone"] = {**_plain(config["backbone"]), **(_plain(backbone) or {})}
    config["heads"] = _plain(heads)
    config.update(_plain(model_overrides))
    model = hydra.utils.instantiate(config)

    own = model.state_dict()
    stored = checkpoint.model_state_dict
    loaded = {k: v for k, v in stored.items() if k in own and own[k].shape == v.shape}
    dens_prefixes = tuple(f"backbone.{p}" for p in getattr(model.backbone, "dens_parameter_prefixes", ()))
    missing = [k for k in own if k.startswith("backbone.") and k not in loaded and not k.startswith(dens_prefixes)]
    if missing:
        raise DeNSSetupError(
            f"{checkpoint_location} does not hold these backbone weights of the new model (or holds other "
            f"shapes): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Change only the backbone's "
            "class (its DeNS twin), otf_graph and the force/stress switches, not its sizes."
        )
    # after the backbone check: a backbone of other sizes resizes its heads too, and is the cause to name
    clashes = sorted(
        {
            k.split(".")[1]
            for k, v in stored.items()
            if k.startswith("output_heads.") and k in own and own[k].shape != v.shape
        }
    )
    if clashes:
        details = [
            f"{k}: {tuple(stored[k].shape)} there, {tuple(own[k].shape)} here"
            for k in sorted(stored)
            if k.startswith("output_heads.") and k in own and own[k].shape != stored[k].shape
        ]
        raise DeNSSetupError(
            f"the new model's head(s) {', '.join(clashes)} do not fit the heads of the same name in "
            f"{checkpoint_location} ({'; '.join(details[:4])}{' ...' if len(details) > 4 else ''}). Give the "
            "head the checkpoint's settings (e.g. the same dataset_names), or another name to start it fresh."
        )
    model.load_state_dict(loaded, strict=False)
    kept_heads = sorted({k.split(".")[1] for k in loaded if k.startswith("output_heads.")})
    logger.info(
        f"DeNS fine-tuning from {checkpoint_location}: backbone loaded, pretrained weights kept "
        f"in heads {kept_heads or 'none'}"
    )
    # resume.yaml rebuilds this model from scratch and then loads the run's own checkpoint
    config["_target_"] = "fairchem.core.models.base.HydraModel"
    model.finetune_model_full_config = config
    return model
