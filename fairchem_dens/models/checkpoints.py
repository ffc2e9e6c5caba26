"""Checkpoints of both existing DeNS implementations, in this plugin's models.

* The **original implementation** (``equiformer_v2_dens`` / ``escn_dens``) saved a
  monolithic model: keys ``force_block.*``, ``energy_block.*``,
  ``denoising_pos_block.*`` and everything else at the top level (one ``module.``
  prefix from DDP runs), the short model name, ``model_attributes`` and legacy
  ``{mean, std}`` normalizers. :func:`convert_original_checkpoint` turns such a file
  into a fairchem 1.10 checkpoint of our hydra models.
* **fairchem's own port** (``equiformer_v2_dens_backbone`` + ``eqV2_DeNS_*``) uses the
  same parameter names as ours, so its checkpoints load unchanged.

Files are read with ``torch.load(..., weights_only=True)``; every checkpoint of both
implementations that we know of loads that way (the original's configs hold only
plain types). A file that needs full unpickling is refused unless the caller opts in.
"""

from __future__ import annotations

import copy
import logging
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from fairchem_dens.models.adapters import adapter, family_of_keys, is_hydra, known_families
from fairchem_dens.core.roles import GRADIENT_OUTPUTS

__all__ = [
    "CheckpointMismatchError",
    "CheckpointReadError",
    "read_checkpoint",
    "strip_ddp_prefix",
    "checkpoint_family",
    "original_model_config",
    "convert_original_checkpoint",
    "explain_mismatch",
    "conservative_finetune_checkpoint",
]

# model_attributes of the original classes that fairchem 1.10's backbones do not take.
_DROPPED = {"num_atoms", "bond_feat_dim", "num_targets", "use_tp_reparam", "use_denoising_energy"}

# Spellings of intermediate fairchem forks (energy_block/force_block inside the heads).
_FORK_ALIASES = (
    ("output_heads.energy.energy_block.", "output_heads.energy.scalar_block."),
    ("output_heads.forces.force_block.", "output_heads.forces.vector_block."),
)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model the config builds."""


class CheckpointReadError(CheckpointMismatchError):
    """A checkpoint file cannot be read: damaged, not a checkpoint, or it needs full unpickling."""


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Loads a checkpoint on the CPU with ``weights_only=True``.

    Args:
        path: the file.
        allow_pickle: fall back to full unpickling for files that need it (only
            for files you trust).

    Raises:
        CheckpointReadError: the file is damaged (e.g. truncated), is not a checkpoint,
            or needs full unpickling and ``allow_pickle`` is not set; the message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types here
        problem = _unreadable_because(path, error)
        if problem is not None:
            raise CheckpointReadError(problem) from error
        if not allow_pickle:
            reason = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler" in line), "")
            raise CheckpointReadError(
                f"{path} needs full unpickling: torch.load(weights_only=True) refuses it ({reason}); "
                "if you trust the file, convert it with `fairchem-dens convert-checkpoint --allow-pickle IN OUT`"
            ) from error
        logging.warning("%s needs full unpickling; loading it with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


# torch.save writes a zip archive; files of torch < 1.6 (or `_use_new_zipfile_serialization=False`)
# are a bare pickle stream, which starts with the PROTO opcode.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


def _unreadable_because(path: Path, error: Exception) -> str | None:
    """Why ``torch.load(weights_only=True)`` failed on ``path``, or None if the file is sound and only needs pickle.

    A damaged file must not be mistaken for one that needs full unpickling: that
    advice (``--allow-pickle``) would end in the same failure, less readable.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    damaged = f"damaged (truncated?) checkpoint file {path} ({size} bytes)"
    remedy = "no torch.load option (nor --allow-pickle) can read it: use an intact copy"
    if size == 0:
        return f"{damaged}: it is empty; {remedy}"
    if head == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                corrupt = archive.testzip()  # checks every member's CRC
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as zip_error:
            return f"{damaged}: its zip archive cannot be opened ({zip_error}; torch: {_first_line(error)}); {remedy}"
        if corrupt is not None:
            return f"{damaged}: member {corrupt} of its zip archive fails its CRC check; {remedy}"
        if not any(name.endswith("/data.pkl") for name in names):
            return (f"{path} ({size} bytes) is not a PyTorch checkpoint: "
                    "a zip archive without the data.pkl torch.save writes")
    elif not head.startswith(_PICKLE_PROTO):
        return (f"{path} ({size} bytes) is not a PyTorch checkpoint: it starts with {head!r}, "
                "neither a zip archive (torch.save) nor a pickle stream (torch.save before 1.6)")
    # torch's weights-only unpickler also reports a short read as an UnpicklingError.
    if isinstance(error, EOFError) or "unexpected EOF" in str(error):
        return f"{damaged}: it ends before its pickle stream does; {remedy}"
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        return None
    return f"{damaged}: {type(error).__name__}: {_first_line(error)}; {remedy}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> OrderedDict:
    """Removes the ``module.`` prefixes DistributedDataParallel adds."""
    out = OrderedDict()
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def checkpoint_family(checkpoint: dict[str, Any]) -> tuple[str, str]:
    """``(layout, family)``: layout ``original`` or ``hydra``, family an adapter's key."""
    keys = list(strip_ddp_prefix(checkpoint["state_dict"]))
    hydra = is_hydra(keys)
    found = family_of_keys(keys)
    if found is None:
        body = sorted({k.split(".")[1 if hydra else 0] for k in keys if not hydra or k.startswith("backbone.")})
        raise CheckpointMismatchError(
            f"the checkpoint's backbone (modules {', '.join(body[:8])}{', ...' if len(body) > 8 else ''}) is "
            f"none of the architectures fairchem-dens has a DeNS adapter for ({known_families()}); "
            "adding one is a module under fairchem_dens/models/ (docs/backbones.md#adding-a-backbone)"
        )
    if not hydra and not found.original_prefixes:
        raise CheckpointMismatchError(
            f"the checkpoint holds a monolithic {found.label} model, a layout only the original DeNS "
            "implementation wrote (EquiformerV2, eSCN); save it as a fairchem hydra model instead"
        )
    return ("hydra" if hydra else "original"), found.family


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
            return new + key[len(old):]
    return "backbone." + key


def _legacy_normalizers(normalizers: dict[str, Any]) -> dict[str, Any]:
    converted = {}
    for name, state in normalizers.items():
        if isinstance(state, dict) and "std" in state:
            state = {"mean": torch.as_tensor(state["mean"]).float(), "rmsd": torch.as_tensor(state["std"]).float()}
        converted[name] = state
    return converted


def _build(model_config: dict[str, Any]) -> torch.nn.Module:
    import fairchem.core.models.base  # noqa: F401  (registers `hydra`)
    from fairchem.core.common.registry import registry

    config = copy.deepcopy(model_config)
    return registry.get_model_class(config.pop("name"))(**config)


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

    model = _build(model_config)
    problems = explain_mismatch(model.state_dict(), state_dict)
    if problems:
        raise CheckpointMismatchError("the original checkpoint does not fit its own config:\n" + problems)

    converted: dict[str, Any] = {
        key: value for key, value in checkpoint.items()
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


def _weights(checkpoint: dict[str, Any], use_ema: bool) -> OrderedDict:
    """The checkpoint's weights, with the EMA's shadow parameters put in when asked and present."""
    state = strip_ddp_prefix(checkpoint["state_dict"])
    ema = checkpoint.get("ema")
    if not use_ema or not ema or not ema.get("shadow_params"):
        return state
    model = _build(checkpoint["config"]["model"])
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
    from fairchem_dens.models import esen

    layout, family = checkpoint_family(checkpoint)
    if family != "esen" or layout != "hydra":
        raise CheckpointMismatchError(
            f"to-conservative converts eSEN checkpoints (fairchem-dens or fairchem DeNS eSEN); this one holds "
            f"{adapter(family).label}, for which fairchem 1.10 has no conservative head"
        )
    if "backbone.force_embedding.bias" not in strip_ddp_prefix(checkpoint["state_dict"]):
        raise CheckpointMismatchError("the checkpoint's eSEN has no force encoding: it is already a plain eSEN")
    config = copy.deepcopy(checkpoint.get("config", {}))
    backbone = {k: v for k, v in config["model"]["backbone"].items() if k != "use_force_encoding"}
    backbone.update(model=esen.PLAIN_BACKBONE, regress_stress=True)
    model_config = {**config["model"], "backbone": backbone, "heads": {"energy": {"module": esen.PLAIN_EFS_HEAD}}}
    model_config.pop("finetune_config", None)
    state_dict = esen.plain_esen_state_dict(_weights(checkpoint, use_ema))
    problems = explain_mismatch(_build(model_config).state_dict(), state_dict)
    if problems:
        raise CheckpointMismatchError("the converted weights do not fit fairchem's eSEN:\n" + problems)
    normalizers = {k: v for k, v in checkpoint.get("normalizers", {}).items() if k == "energy"}
    energy_rmsd = normalizers["energy"]["rmsd"].clone() if "energy" in normalizers else torch.tensor(1.0)
    for name in GRADIENT_OUTPUTS:
        normalizers[name] = {"mean": torch.zeros_like(energy_rmsd), "rmsd": energy_rmsd.clone()}
    config["model"] = model_config
    config["trainer"] = "mlip_trainer"
    config["optim"] = {k: v for k, v in config.get("optim", {}).items()
                       if k not in ("use_denoising_pos", "denoising_pos_params", "denoising_pos_coefficient")}
    config["converted_from"] = {"stage": "direct DeNS pre-training", "ema": bool(use_ema and checkpoint.get("ema"))}
    return {
        "state_dict": state_dict,
        "normalizers": normalizers,
        "elementrefs": checkpoint.get("elementrefs", {}),
        "config": config,
        "epoch": 0,
        "step": 0,
        "best_val_metric": None,
        "primary_metric": checkpoint.get("primary_metric"),
        "amp": None,
    }


def _reorder_ema(ema: dict[str, Any], original_state: OrderedDict, family: str, model: torch.nn.Module):
    """The EMA's shadow parameters, from the original model's order to ours."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # The original state dict lists parameters in registration order, as named_parameters() does.
    original_order = [k for k in original_state if _rename_original(k, family) in trainable]
    shadow = list(ema["shadow_params"])
    if len(shadow) != len(original_order):
        raise CheckpointMismatchError(
            f"the EMA holds {len(shadow)} parameters but the model has {len(original_order)}"
        )
    by_name = {_rename_original(k, family): t for k, t in zip(original_order, shadow)}
    ours = [name for name, p in model.named_parameters() if p.requires_grad]
    return {**ema, "shadow_params": [by_name[name] for name in ours], "collected_params": []}


def _module_of(key: str) -> str:
    parts = key.split(".")
    depth = 3 if key.startswith("output_heads.") else 2
    return ".".join(parts[:depth])


_HINTS = {
    "noise_schedule_sigma_embedding": "model.backbone.use_noise_schedule_sigma_encoding",
    "force_embedding": "a DeNS backbone (force encoding); plain fairchem checkpoints have none",
    "denoising_pos_block": "a DeNS force head (noise head); plain checkpoints have none",
    "denoising_linear": "a DeNS force head (noise head); plain checkpoints have none",
    "energy_lin_ref": "model.backbone.use_energy_lin_ref / load_energy_lin_ref",
}


def explain_mismatch(model_state: dict[str, torch.Tensor], checkpoint_state: dict[str, torch.Tensor]) -> str:
    """Describes, module by module, why a state dict does not fit a model ('' if it does)."""
    model_keys, ckpt_keys = set(model_state), set(checkpoint_state)
    lines = []
    model_family, ckpt_family = family_of_keys(model_keys), family_of_keys(ckpt_keys)
    if ckpt_family is not None and model_family is not None and model_family != ckpt_family:
        return (f"the checkpoint holds an {ckpt_family.label} model but the config builds an {model_family.label} "
                "model: use a config of the checkpoint's architecture")
    for label, keys, other in (("missing from the checkpoint", model_keys - ckpt_keys, "config"),
                               ("in the checkpoint but not in the model", ckpt_keys - model_keys, "checkpoint")):
        for module in sorted({_module_of(k) for k in keys}):
            hint = next((h for word, h in _HINTS.items() if word in module), None)
            count = sum(1 for k in keys if _module_of(k) == module)
            lines.append(f"- {module} ({count} tensors) {label}" + (f"; check {hint}" if hint else ""))
    differing: dict[str, list[str]] = {}
    for key in sorted(model_keys & ckpt_keys):
        if tuple(model_state[key].shape) != tuple(checkpoint_state[key].shape):
            differing.setdefault(_module_of(key), []).append(key)
    for module, keys in differing.items():
        key = keys[0]
        lines.append(
            f"- {module}: {len(keys)} tensors differ in shape, e.g. {key}: checkpoint shape "
            f"{tuple(checkpoint_state[key].shape)}, model shape {tuple(model_state[key].shape)}"
        )
    if differing:
        lines.append("  (sizes such as lmax_list, mmax_list, sphere_channels, num_layers or "
                     "max_num_elements differ between the config and the checkpoint)")
    return "\n".join(lines)


def normalize_fork_keys(state_dict: dict[str, torch.Tensor]) -> OrderedDict:
    """Accepts the ``energy_block``/``force_block`` head spellings of intermediate forks."""
    out = OrderedDict()
    for key, value in state_dict.items():
        for old, new in _FORK_ALIASES:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out
