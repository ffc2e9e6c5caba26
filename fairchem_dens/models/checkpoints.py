"""Reading checkpoints and explaining why one does not fit a model.

Two implementations of DeNS wrote checkpoints that our models load:

* the **original implementation** (``equiformer_v2_dens`` / ``escn_dens``) saved a
  monolithic model (``force_block.*``, ``energy_block.*``, ``denoising_pos_block.*`` and
  the backbone at the top level, one ``module.`` prefix from DDP runs):
  :func:`checkpoint_family` calls that layout ``original``, and
  :mod:`fairchem_dens.models.convert_original` turns it into ours;
* **fairchem's own port** (``equiformer_v2_dens_backbone`` + ``eqV2_DeNS_*``) uses the
  same parameter names as ours (layout ``hydra``), so its checkpoints load unchanged.

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

from fairchem_dens.errors import FairchemDensError
from fairchem_dens.models.adapters import backbone_keys, family_of_keys, is_hydra, known_families, noise_blocks

__all__ = [
    "CheckpointMismatchError",
    "CheckpointReadError",
    "read_checkpoint",
    "strip_ddp_prefix",
    "checkpoint_family",
    "model_from_config",
    "explain_mismatch",
    "normalize_fork_keys",
]

# Spellings of intermediate fairchem forks (energy_block/force_block inside the heads).
_FORK_ALIASES = (
    ("output_heads.energy.energy_block.", "output_heads.energy.scalar_block."),
    ("output_heads.forces.force_block.", "output_heads.forces.vector_block."),
)


class CheckpointMismatchError(FairchemDensError, ValueError):
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
            return (
                f"{path} ({size} bytes) is not a PyTorch checkpoint: "
                "a zip archive without the data.pkl torch.save writes"
            )
    elif not head.startswith(_PICKLE_PROTO):
        return (
            f"{path} ({size} bytes) is not a PyTorch checkpoint: it starts with {head!r}, "
            "neither a zip archive (torch.save) nor a pickle stream (torch.save before 1.6)"
        )
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
            key = key[len("module.") :]
        out[key] = value
    return out


def checkpoint_family(checkpoint: dict[str, Any]) -> tuple[str, str]:
    """``(layout, family)``: layout ``original`` or ``hydra``, family an adapter's key."""
    keys = list(strip_ddp_prefix(checkpoint["state_dict"]))
    hydra = is_hydra(keys)
    found = family_of_keys(keys)
    if found is None:
        body = sorted({key.split(".")[0] for key in backbone_keys(keys)})
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


def model_from_config(model_config: dict[str, Any]) -> torch.nn.Module:
    """The model a checkpoint's ``config["model"]`` describes, built through fairchem's registry."""
    import fairchem.core.models.base  # noqa: F401  (registers `hydra`)
    from fairchem.core.common.registry import registry

    config = copy.deepcopy(model_config)
    return registry.get_model_class(config.pop("name"))(**config)


def _module_of(key: str) -> str:
    parts = key.split(".")
    depth = 3 if key.startswith("output_heads.") else 2
    return ".".join(parts[:depth])


def _hints() -> dict[str, str]:
    """What to check when a module with this word in its name is missing or extra."""
    noise = dict.fromkeys(noise_blocks(), "a DeNS force head (noise head); plain checkpoints have none")
    return {
        "noise_schedule_sigma_embedding": "model.backbone.use_noise_schedule_sigma_encoding",
        "force_embedding": "a DeNS backbone (force encoding); plain fairchem checkpoints have none",
        **noise,
        "energy_lin_ref": "model.backbone.use_energy_lin_ref / load_energy_lin_ref",
    }


def explain_mismatch(model_state: dict[str, torch.Tensor], checkpoint_state: dict[str, torch.Tensor]) -> str:
    """Describes, module by module, why a state dict does not fit a model ('' if it does)."""
    model_keys, ckpt_keys = set(model_state), set(checkpoint_state)
    lines, hints = [], _hints()
    model_family, ckpt_family = family_of_keys(model_keys), family_of_keys(ckpt_keys)
    if ckpt_family is not None and model_family is not None and model_family != ckpt_family:
        return (
            f"the checkpoint holds an {ckpt_family.label} model but the config builds an {model_family.label} "
            "model: use a config of the checkpoint's architecture"
        )
    for label, keys, other in (
        ("missing from the checkpoint", model_keys - ckpt_keys, "config"),
        ("in the checkpoint but not in the model", ckpt_keys - model_keys, "checkpoint"),
    ):
        for module in sorted({_module_of(k) for k in keys}):
            hint = next((h for word, h in hints.items() if word in module), None)
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
        lines.append(
            "  (sizes such as lmax_list, mmax_list, sphere_channels, num_layers or "
            "max_num_elements differ between the config and the checkpoint)"
        )
    return "\n".join(lines)


def normalize_fork_keys(state_dict: dict[str, torch.Tensor]) -> OrderedDict:
    """Accepts the ``energy_block``/``force_block`` head spellings of intermediate forks."""
    out = OrderedDict()
    for key, value in state_dict.items():
        for old, new in _FORK_ALIASES:
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out
