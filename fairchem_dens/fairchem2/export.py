"""The inference checkpoint of a DeNS run as plain fairchem: loadable without this package.

fairchem writes ``inference_ckpt.pt`` (an ``MLIPInferenceCheckpoint``: the model's Hydra
config, its state dict and the EMA state dict, the task configs). For a DeNS model the
config names our classes and the state dicts hold the force encoding and the noise head.
A batch the trainer did not corrupt gets only the encoding layer's bias, on every atom's
l = 0 features, and fairchem's ``Linear_Force_Head`` output from the force head. So each
DeNS class is replaced by the fairchem class it names (``fairchem_plain``), the encoding's
bias is added to every row of the atom embedding
(:func:`fairchem_dens.core.encoding.fold_force_encoding_bias`: the same sum, rounded in
another order), the other DeNS-only parameters (``dens_parameter_prefixes``) and keywords
are dropped, and every other weight is kept as is.
"""

from __future__ import annotations

import copy
from typing import Any

from fairchem.core.common.registry import registry
from omegaconf import DictConfig, OmegaConf

from fairchem_dens.core.encoding import fold_force_encoding_bias
from fairchem_dens.core.modules import DENS_BACKBONE_KEYWORDS

__all__ = ["plain_inference_checkpoint", "plain_model_config"]


#: Keywords of our heads that fairchem's plain classes do not take.
DENS_HEAD_KEYWORDS = ("noise_head",)


def _plain(name: str) -> tuple[str, tuple[str, ...]]:
    """The plain class name for a model/head name, and the parameter prefixes to drop."""
    cls = registry.get_model_class(name)
    plain = getattr(cls, "fairchem_plain", None)
    return (name, ()) if plain is None else (plain, tuple(cls.dens_parameter_prefixes))


def plain_model_config(model_config: Any) -> tuple[dict, list[str]]:
    """A HydraModel config with fairchem's classes in place of ours, and the state-dict prefixes to drop.

    Args:
        model_config: ``runner.train_eval_unit.model`` of the run (a dict or DictConfig).

    Returns:
        ``(config, prefixes)``: prefixes such as ``backbone.force_embedding.`` and
        ``output_heads.forces.noise_linear.``.
    """
    if isinstance(model_config, DictConfig):
        model_config = OmegaConf.to_container(model_config, resolve=True)
    config = copy.deepcopy(dict(model_config))
    prefixes = []
    backbone = {key: value for key, value in dict(config["backbone"]).items() if key not in DENS_BACKBONE_KEYWORDS}
    backbone["model"], dropped = _plain(backbone["model"])
    prefixes += [f"backbone.{p}" for p in dropped]
    config["backbone"] = backbone
    heads = {}
    for name, head in dict(config.get("heads") or {}).items():
        head = {key: value for key, value in dict(head).items() if key not in DENS_HEAD_KEYWORDS}
        head["module"], dropped = _plain(head["module"])
        prefixes += [f"output_heads.{name}.{p}" for p in dropped]
        if "head_cls" in head:  # UMA's DatasetSpecific*Wrapper builds its inner head as `.head`
            head["head_cls"], dropped = _plain(head["head_cls"])
            prefixes += [f"output_heads.{name}.head.{p}" for p in dropped]
        heads[name] = head
    config["heads"] = heads
    return config, prefixes


def _without(state_dict: dict | None, prefixes: list[str]) -> dict | None:
    if state_dict is None:
        return None
    # EMA keys carry AveragedModel's `module.` prefix.
    for module in ("", "module."):
        if f"{module}backbone.force_embedding.bias" in state_dict:
            state_dict = fold_force_encoding_bias(state_dict, prefix=f"{module}backbone.")
    dropped = tuple(prefixes) + tuple(f"module.{p}" for p in prefixes)
    return type(state_dict)((k, v) for k, v in state_dict.items() if not k.startswith(dropped))


def plain_inference_checkpoint(checkpoint: Any) -> Any:
    """The ``MLIPInferenceCheckpoint`` with fairchem's plain model (returns a new object)."""
    config, prefixes = plain_model_config(checkpoint.model_config)
    plain = copy.copy(checkpoint)
    plain.model_config = config
    plain.model_state_dict = _without(checkpoint.model_state_dict, prefixes)
    plain.ema_state_dict = _without(checkpoint.ema_state_dict, prefixes)
    return plain
