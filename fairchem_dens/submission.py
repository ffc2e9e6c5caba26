"""Checked submission files for the OC20 / OC22 evaluation server (EvalAI).

fairchem's ``--mode predict`` (and ``run-relaxations`` with ``task.write_pos``)
writes one prediction file per test split. The server wants them merged into a
single ``np.savez_compressed`` archive whose keys are ``{split}_{key}``.
fairchem's own ``scripts/make_submission_file.py`` merges blindly; the server
then rejects (or silently mis-scores) files with pickled object arrays, 2-D
energies, float16 OC22 predictions or total energies submitted to OC20. This
module checks all of that before writing anything, writes atomically, and
records where the predictions came from in a JSON sidecar.

Typical use::

    build_submission(
        "s2ef", "oc20",
        {"id": "id/s2ef_predictions.npz", "ood_ads": ..., "ood_cat": ..., "ood_both": ...},
        "submission.npz", checkpoint="best_checkpoint.pt", config="config.yml",
    )
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fairchem_dens.errors import FairchemDensError
from fairchem_dens.files import sha256_file, temp_beside

#: Test splits the server expects, in the order they are written.
SPLITS: dict[str, tuple[str, ...]] = {
    "oc20": ("id", "ood_ads", "ood_cat", "ood_both"),
    "oc22": ("id", "ood"),
}

#: Keys every per-split file of a task must hold (others are passed through).
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "s2ef": ("ids", "energy", "forces", "chunk_idx"),
    "is2re": ("ids", "energy"),
    "is2rs": ("ids", "pos", "chunk_idx"),
    "is2re-relaxations": ("ids", "energy"),
}

#: Number of systems per OC20 *test* split. Only test submissions have to match,
#: so a mismatch is a warning unless ``strict_counts`` is set.
EXPECTED_COUNTS: dict[tuple[str, str], dict[str, int]] = {
    ("oc20", "s2ef"): {"id": 999_736, "ood_ads": 999_859, "ood_cat": 999_826, "ood_both": 999_973},
    ("oc20", "is2re"): {"id": 24_948, "ood_ads": 24_930, "ood_cat": 24_965, "ood_both": 24_985},
    ("oc20", "is2rs"): {"id": 24_948, "ood_ads": 24_930, "ood_cat": 24_965, "ood_both": 24_985},
    ("oc20", "is2re-relaxations"): {"id": 24_948, "ood_ads": 24_930, "ood_cat": 24_965, "ood_both": 24_985},
}

#: Above this mean |energy| (eV) OC20 predictions look like total, not adsorption, energies:
#: adsorption energies are within a few eV, OC20 total energies are hundreds of eV.
TOTAL_ENERGY_THRESHOLD_EV = 10.0

#: Per-atom arrays that come with a ``chunk_idx`` (fairchem keeps the plain name for forces).
_ATOM_KEYS = {"s2ef": "forces", "is2rs": "pos"}

_FLOAT16_HINT = (
    "OC22 needs float32 predictions: re-run `fairchem --mode predict` with "
    "`--task.prediction_dtype=float32` (config `task.prediction_dtype: float32`)"
)


class SubmissionError(FairchemDensError, ValueError):
    """A prediction file or the merged submission would be rejected by the server."""


class SubmissionWarning(UserWarning):
    """Something looks wrong but may be intended (e.g. a validation-split submission)."""


# --------------------------------------------------------------------------- public API


def build_submission(
    task: str,
    dataset: str,
    split_files: Mapping[str, str | Path],
    out_path: str | Path,
    *,
    checkpoint: str | Path | None = None,
    config: dict | str | Path | None = None,
    allow_total_energy: bool = False,
    strict_counts: bool = False,
    overwrite: bool = False,
) -> Path:
    """Validates per-split predictions and writes one server-ready ``.npz``.

    Args:
        task: ``"s2ef"``, ``"is2re"``, ``"is2rs"`` or ``"is2re-relaxations"``
            (IS2RE energies read from the last frame of ``{sid}.traj`` files).
        dataset: ``"oc20"`` or ``"oc22"``.
        split_files: split name -> prediction ``.npz`` written by fairchem (for
            ``is2re-relaxations``: a directory of ``*.traj`` files). Every split of
            :data:`SPLITS` for the dataset must be given, and no other.
        out_path: where to write the submission; ``.npz`` is appended if missing.
            A JSON sidecar ``<out_path>.json`` is written beside it.
        checkpoint: the model checkpoint used, recorded (path and sha256) in the sidecar.
        config: the training/predict config (dict or YAML file), recorded in the
            sidecar and used to refuse OC20 submissions from total-energy models.
        allow_total_energy: submit OC20 predictions from a total-energy model anyway.
        strict_counts: make a mismatch with the official OC20 test-split sizes an
            error instead of a warning.
        overwrite: replace an existing output (and sidecar).

    Returns:
        The path of the written ``.npz``.

    Raises:
        SubmissionError: a file is missing, unreadable or invalid; the message names
            the split, file and key. Nothing is written in that case.
    """
    task, dataset = _normalize_task(task), _normalize_dataset(dataset)
    out = _npz_path(out_path)
    sidecar = out.with_name(out.name + ".json")
    if not overwrite:
        _refuse_existing(out, sidecar)
    files = _normalize_split_files(dataset, split_files)

    if checkpoint is not None and not Path(checkpoint).is_file():  # fail before reading GBs
        raise SubmissionError(f"checkpoint not found: {checkpoint}")
    config_dict, config_source = _load_config(config)
    total_energy_reason = detect_total_energy(config_dict) if config_dict is not None else None
    if dataset == "oc20" and total_energy_reason and not allow_total_energy:
        raise SubmissionError(
            f"the config trains on total energies ({total_energy_reason}); OC20 scores "
            "adsorption energies, so this model's energies would be wrong. Pass "
            "allow_total_energy=True (--allow-total-energy) only if you know they are "
            "adsorption energies"
        )

    per_split = {split: read_split(task, dataset, split, path) for split, path in files.items()}
    for split, arrays in per_split.items():
        _check_counts(dataset, task, split, files[split], len(arrays["ids"]), strict_counts)
    if dataset == "oc20" and not allow_total_energy:
        _warn_if_total_energies(per_split, files)

    merged = merge_splits(per_split)
    # Validate the merged mapping through the same checks, so a bug in merging
    # (a dropped key, a split prefix clash) cannot reach the server.
    _validate_merged(task, dataset, merged, files)

    provenance = _provenance(
        task,
        dataset,
        files,
        per_split,
        checkpoint,
        config_dict,
        config_source,
        allow_total_energy,
        total_energy_reason,
    )
    _write_outputs(out, sidecar, merged, provenance, files, overwrite)
    return out


def read_split(task: str, dataset: str, split: str, path: str | Path) -> dict[str, np.ndarray]:
    """Loads and validates one split's predictions.

    Args:
        task: a key of :data:`TASK_KEYS`.
        dataset: ``"oc20"`` or ``"oc22"``.
        split: split name, used in error messages.
        path: the ``.npz`` written by fairchem, or for ``is2re-relaxations`` a
            directory of ``{sid}.traj`` files.

    Returns:
        The arrays, with energies flattened to 1-D and (OC22) floats as float32.
    """
    task, dataset = _normalize_task(task), _normalize_dataset(dataset)
    path = Path(path)
    if task == "is2re-relaxations":
        arrays = _read_relaxations(dataset, split, path)
    else:
        arrays = _read_npz(split, path)
    return validate_split(task, dataset, split, path, arrays)


def validate_split(
    task: str, dataset: str, split: str, path: str | Path, arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Checks one split's arrays against the server's expectations.

    Args:
        task: a key of :data:`TASK_KEYS`.
        dataset: ``"oc20"`` or ``"oc22"``.
        split: split name, for messages.
        path: where the arrays came from, for messages.
        arrays: key -> array, as in the per-split file.

    Returns:
        A new dict: energies flattened from ``(N, 1)``; for OC22 float64 cast to float32.

    Raises:
        SubmissionError: naming split, file and key.
    """
    task, dataset = _normalize_task(task), _normalize_dataset(dataset)
    where = _Where(split, Path(path))
    missing = [key for key in TASK_KEYS[task] if key not in arrays]
    if missing:
        raise SubmissionError(f"{where}: missing key(s) {missing} for task {task} (has {sorted(arrays)})")
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        _check_plain_dtype(where, key, value)
        out[key] = _check_float_dtype(where, dataset, key, value)

    n = _check_ids(where, out["ids"])
    if "energy" in out:
        out["energy"] = _check_energy(where, out["energy"], n)
    for key, value in out.items():
        if key == "chunk_idx" or key.endswith("_chunk_idx"):
            # fairchem names the index of `forces` plain `chunk_idx` (and of IS2RS `pos`);
            # other per-atom outputs X come with `X_chunk_idx`.
            atom_key = _ATOM_KEYS.get(task, "forces") if key == "chunk_idx" else key[: -len("_chunk_idx")]
            out[key] = _check_chunk_idx(where, key, value, n, out.get(atom_key), atom_key)
    for key in ("forces", "pos"):
        if key in out:
            _check_xyz(where, key, out[key])
    for key, value in out.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise SubmissionError(f"{where}, key {key!r}: {_count_nonfinite(value)} non-finite values")
    return out


def merge_splits(per_split: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``{split: {key: array}}`` -> ``{f"{split}_{key}": array}``, the server's layout."""
    merged: dict[str, np.ndarray] = {}
    for split, arrays in per_split.items():
        for key, value in arrays.items():
            name = f"{split}_{key}"
            if name in merged:  # e.g. split "a" key "b_c" vs split "a_b" key "c"
                raise SubmissionError(f"split {split!r}: merged key {name!r} is ambiguous")
            merged[name] = value
    return merged


def detect_total_energy(config: Mapping[str, Any]) -> str | None:
    """Why a fairchem config trains on total energies, or ``None`` if it does not.

    Looks for the OC22 dataset format, element-reference transforms (``lin_ref``
    in older configs) and ``total_energy`` / ``train_on_oc20_total_energies`` flags.
    """
    task = config.get("task") or {}
    if isinstance(task, Mapping) and task.get("dataset") == "oc22_lmdb":
        return "task.dataset is oc22_lmdb"
    for name, section in _dataset_sections(config.get("dataset")):
        if section.get("format") == "oc22_lmdb":
            return f"{name}.format is oc22_lmdb"
        transforms = section.get("transforms") or {}
        if isinstance(transforms, Mapping) and "element_references" in transforms:
            return f"{name}.transforms.element_references is set"
        if section.get("lin_ref"):
            return f"{name}.lin_ref is set"
    for dotted, value in _walk(config):
        leaf = dotted.rsplit(".", 1)[-1]
        if leaf in ("total_energy", "train_on_oc20_total_energies") and value is True:
            return f"{dotted} is true"
    return None


# --------------------------------------------------------------------------- reading


class _Where:
    """``split 'id' (path)`` for messages."""

    def __init__(self, split: str, path: Path) -> None:
        self.split, self.path = split, path

    def __str__(self) -> str:
        return f"split {self.split!r} ({self.path})"


def _read_npz(split: str, path: Path) -> dict[str, np.ndarray]:
    where = _Where(split, path)
    if path.is_dir():
        raise SubmissionError(f"{where}: is a directory; for relaxation trajectories use task 'is2re-relaxations'")
    if not path.is_file():
        raise SubmissionError(f"{where}: prediction file not found")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise SubmissionError(f"{where}: not a readable .npz file ({error})") from error
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise SubmissionError(f"{where}: expected an .npz archive, found a single .npy array")
    arrays = {}
    with npz:
        for key in npz.files:
            try:
                arrays[key] = npz[key]
            except ValueError as error:
                # numpy refuses object arrays without pickling; so does the server.
                raise SubmissionError(
                    f"{where}, key {key!r}: needs pickling (object array), which the "
                    f"evaluation server refuses ({error})"
                ) from error
            except (OSError, zipfile.BadZipFile) as error:
                raise SubmissionError(f"{where}, key {key!r}: unreadable ({error})") from error
    return arrays


def _read_relaxations(dataset: str, split: str, folder: Path) -> dict[str, np.ndarray]:
    """IS2RE from ``run-relaxations`` trajectories: ids are file stems, energy the last frame's."""
    import ase.io  # only this path needs ASE

    where = _Where(split, folder)
    if not folder.is_dir():
        raise SubmissionError(f"{where}: expected a directory of *.traj relaxation trajectories")
    trajectories = sorted(folder.glob("*.traj"))
    if not trajectories:
        raise SubmissionError(f"{where}: no *.traj files")
    ids, energies = [], []
    for traj in trajectories:
        try:
            energy = ase.io.read(traj, "-1").get_potential_energy()
        except Exception as error:  # noqa: BLE001 - ASE raises many types for bad files
            raise SubmissionError(f"{where}, file {traj.name}: no energy in the last frame ({error})") from error
        ids.append(traj.stem)
        energies.append(energy)
    # OC22 wants float32; writing it directly avoids a pointless cast warning.
    dtype = np.float32 if dataset == "oc22" else np.float64
    return {"ids": np.array(ids, dtype=str), "energy": np.array(energies, dtype=dtype)}


def _load_config(config: dict | str | Path | None) -> tuple[dict | None, str | None]:
    """The config as a dict (fairchem ``includes:`` resolved) and its file, if any."""
    if config is None:
        return None, None
    if isinstance(config, Mapping):
        return dict(config), None
    path = Path(config)
    if not path.is_file():
        raise SubmissionError(f"config file not found: {path}")
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SubmissionError(f"config {path}: invalid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise SubmissionError(f"config {path}: expected a mapping at the top level")
    if loaded.get("includes"):
        # Total-energy settings usually live in an included dataset file, so resolve
        # includes exactly as fairchem does (imported lazily: it pulls in torch).
        from fairchem.core.common.utils import load_config

        try:
            loaded = load_config(str(path))[0]
        except Exception as error:  # noqa: BLE001 - missing include, cycles, duplicates
            raise SubmissionError(f"config {path}: cannot resolve includes ({error})") from error
    return loaded, str(path)


def _dataset_sections(dataset: Any) -> Iterator[tuple[str, Mapping]]:
    """``dataset`` itself and its ``train``/``val``/``test`` sub-sections that are mappings."""
    if isinstance(dataset, Mapping):
        yield "dataset", dataset
        for name, section in dataset.items():
            if isinstance(section, Mapping):
                yield f"dataset.{name}", section
    elif isinstance(dataset, list):  # older configs: a list of split configs
        for i, section in enumerate(dataset):
            if isinstance(section, Mapping):
                yield f"dataset[{i}]", section


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(dotted.key, value)`` in nested mappings and lists."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted, value
            yield from _walk(value, dotted)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{prefix}[{i}]")


# --------------------------------------------------------------------------- checks


def _normalize_task(task: str) -> str:
    name = task.lower().replace("_", "-")
    if name not in TASK_KEYS:
        raise SubmissionError(f"unknown task {task!r}; expected one of {sorted(TASK_KEYS)}")
    return name


def _normalize_dataset(dataset: str) -> str:
    name = dataset.lower()
    if name not in SPLITS:
        raise SubmissionError(f"unknown dataset {dataset!r}; expected one of {sorted(SPLITS)}")
    return name


def _normalize_split_files(dataset: str, split_files: Mapping[str, str | Path]) -> dict[str, Path]:
    """Split names as the server spells them (``ood-ads`` -> ``ood_ads``), in server order."""
    given = {str(split).lower().replace("-", "_"): Path(path) for split, path in split_files.items()}
    expected = SPLITS[dataset]
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise SubmissionError(f"unknown split(s) {unknown} for {dataset}; expected exactly {list(expected)}")
    missing = [split for split in expected if split not in given]
    if missing:
        raise SubmissionError(f"missing split(s) {missing} for {dataset}: the server needs all of {list(expected)}")
    return {split: given[split] for split in expected}


def _check_plain_dtype(where: _Where, key: str, value: np.ndarray) -> None:
    if not isinstance(value, np.ndarray):
        raise SubmissionError(f"{where}, key {key!r}: not a numpy array ({type(value).__name__})")
    if value.dtype.kind in "OV":
        raise SubmissionError(
            f"{where}, key {key!r}: dtype {value.dtype} (object/structured arrays need "
            "pickling, which the evaluation server refuses)"
        )


def _check_float_dtype(where: _Where, dataset: str, key: str, value: np.ndarray) -> np.ndarray:
    """OC22 scores float32 only: float16 loses too much, float64 is cast with a warning."""
    if dataset != "oc22" or value.dtype.kind != "f" or value.dtype == np.float32:
        return value
    if value.dtype == np.float16:
        raise SubmissionError(f"{where}, key {key!r}: float16 predictions. {_FLOAT16_HINT}")
    warnings.warn(f"{where}, key {key!r}: casting {value.dtype} to float32 for OC22", SubmissionWarning, stacklevel=4)
    return value.astype(np.float32)


def _check_ids(where: _Where, ids: np.ndarray) -> int:
    if ids.ndim != 1:
        raise SubmissionError(f"{where}, key 'ids': expected 1-D, got shape {ids.shape}")
    if ids.dtype.kind != "U":
        raise SubmissionError(f"{where}, key 'ids': expected a unicode string array, got dtype {ids.dtype}")
    if ids.size == 0:
        raise SubmissionError(f"{where}, key 'ids': no systems")
    if (np.char.str_len(ids) == 0).any():
        raise SubmissionError(f"{where}, key 'ids': contains empty ids")
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        dupes = unique[counts > 1]
        raise SubmissionError(f"{where}, key 'ids': {len(dupes)} duplicated id(s), e.g. {dupes[:3].tolist()}")
    return len(ids)


def _check_energy(where: _Where, energy: np.ndarray, n: int) -> np.ndarray:
    # Older fairchem versions wrote (N, 1); the server wants (N,).
    if energy.ndim == 2 and energy.shape[1] == 1:
        energy = energy.reshape(-1)
    if energy.ndim != 1:
        raise SubmissionError(
            f"{where}, key 'energy': expected shape ({n},) (one energy per system), got {energy.shape}"
        )
    if energy.dtype.kind != "f":
        raise SubmissionError(f"{where}, key 'energy': expected floats, got dtype {energy.dtype}")
    if len(energy) != n:
        raise SubmissionError(f"{where}, key 'energy': {len(energy)} energies for {n} ids")
    return energy


def _check_xyz(where: _Where, key: str, value: np.ndarray) -> None:
    if value.ndim != 2 or value.shape[1] != 3:
        raise SubmissionError(f"{where}, key {key!r}: expected shape (n_atoms, 3), got {value.shape}")
    if value.dtype.kind != "f":
        raise SubmissionError(f"{where}, key {key!r}: expected floats, got dtype {value.dtype}")


def _check_chunk_idx(
    where: _Where, key: str, chunk_idx: np.ndarray, n: int, atoms: np.ndarray | None, atom_key: str | None
) -> np.ndarray:
    """``chunk_idx`` = cumulative per-system atom counts without the last (np.split style)."""
    if chunk_idx.ndim != 1:
        raise SubmissionError(f"{where}, key {key!r}: expected 1-D, got shape {chunk_idx.shape}")
    if chunk_idx.size == 0:
        chunk_idx = chunk_idx.astype(np.int64)  # np.cumsum([])[:-1] is float64 and harmless
    if chunk_idx.dtype.kind not in "iu":
        raise SubmissionError(f"{where}, key {key!r}: expected integers, got dtype {chunk_idx.dtype}")
    if len(chunk_idx) != n - 1:
        raise SubmissionError(f"{where}, key {key!r}: length {len(chunk_idx)}, expected len(ids) - 1 = {n - 1}")
    if atoms is None:
        raise SubmissionError(f"{where}, key {key!r}: no per-atom array {atom_key!r} to split")
    if chunk_idx.size:
        if chunk_idx[0] < 0 or (np.diff(chunk_idx) < 0).any():
            raise SubmissionError(f"{where}, key {key!r}: not non-decreasing from 0")
        if chunk_idx[-1] > len(atoms):
            raise SubmissionError(
                f"{where}, key {key!r}: last index {int(chunk_idx[-1])} exceeds the {len(atoms)} rows of {atom_key!r}"
            )
    # What the server does with it: split into one block per id, covering every row.
    sizes = np.diff(np.concatenate([[0], chunk_idx, [len(atoms)]]))
    if len(sizes) != n or sizes.sum() != len(atoms):
        raise SubmissionError(
            f"{where}, key {key!r}: splits {atom_key!r} into {len(sizes)} blocks of "
            f"{int(sizes.sum())} rows, expected {n} blocks of {len(atoms)} rows"
        )
    return chunk_idx


def _count_nonfinite(value: np.ndarray) -> int:
    return int(value.size - np.isfinite(value).sum())


def _check_counts(dataset: str, task: str, split: str, path: Path, n: int, strict: bool) -> None:
    expected = EXPECTED_COUNTS.get((dataset, task), {}).get(split)
    if expected is None or n == expected:
        return
    message = (
        f"split {split!r} ({path}): {n} systems, the {dataset} {task} test split has {expected} "
        "(fine for a validation-split submission, not for the leaderboard)"
    )
    if strict:
        raise SubmissionError(message)
    warnings.warn(message, SubmissionWarning, stacklevel=3)


def _warn_if_total_energies(per_split: Mapping[str, Mapping[str, np.ndarray]], files: Mapping[str, Path]) -> None:
    for split, arrays in per_split.items():
        if "energy" not in arrays:
            continue
        mean_abs = float(np.abs(arrays["energy"].astype(np.float64)).mean())
        if mean_abs > TOTAL_ENERGY_THRESHOLD_EV:
            warnings.warn(
                f"split {split!r} ({files[split]}): mean |energy| is {mean_abs:.1f} eV; OC20 "
                "adsorption energies are within a few eV, so these look like total energies",
                SubmissionWarning,
                stacklevel=3,
            )


def _validate_merged(task: str, dataset: str, merged: Mapping[str, np.ndarray], files: Mapping[str, Path]) -> None:
    """Re-reads each split from the merged keys and runs the split checks again."""
    for split, path in files.items():
        prefix = f"{split}_"
        view = {
            name[len(prefix) :]: value
            for name, value in merged.items()
            # "ood_" would also match "ood_ads_*" etc.; exclude other splits' keys.
            if name.startswith(prefix)
            and not any(
                other != split and name.startswith(f"{other}_") and len(other) > len(split) for other in SPLITS[dataset]
            )
        }
        validate_split(task, dataset, split, path, view)
    extra = [name for name in merged if not any(name.startswith(f"{s}_") for s in SPLITS[dataset])]
    if extra:
        raise SubmissionError(f"merged submission has keys of no split: {extra}")


# --------------------------------------------------------------------------- writing


def _npz_path(out_path: str | Path) -> Path:
    out = Path(out_path)
    return out if out.suffix == ".npz" else out.with_name(out.name + ".npz")


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise SubmissionError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")


def _input_hash(path: Path) -> str:
    """sha256 of a file; for a folder of trajectories, of its ``"name sha256\\n"`` lines."""
    if path.is_file():
        return sha256_file(path)
    lines = "".join(f"{traj.name} {sha256_file(traj)}\n" for traj in sorted(path.glob("*.traj")))
    return hashlib.sha256(lines.encode()).hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _provenance(
    task: str,
    dataset: str,
    files: Mapping[str, Path],
    per_split: Mapping[str, Mapping[str, np.ndarray]],
    checkpoint: str | Path | None,
    config: dict | None,
    config_source: str | None,
    allow_total_energy: bool,
    total_energy_reason: str | None,
) -> dict[str, Any]:
    import fairchem_dens

    record: dict[str, Any] = {
        "task": task,
        "dataset": dataset,
        "splits": {
            split: {
                "count": int(len(arrays["ids"])),
                "path": str(files[split].resolve()),
                "sha256": _input_hash(files[split]),
                "keys": {key: {"shape": list(v.shape), "dtype": str(v.dtype)} for key, v in arrays.items()},
            }
            for split, arrays in per_split.items()
        },
        "allow_total_energy": allow_total_energy,
        "total_energy_reason": total_energy_reason,
        "checkpoint": None,
        "config": config,
        "config_path": config_source,
        "versions": {
            "fairchem-dens": fairchem_dens.__version__,
            "fairchem-core": _version("fairchem-core"),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise SubmissionError(f"checkpoint not found: {path}")
        record["checkpoint"] = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    return record


def _check_written(out: Path, merged: Mapping[str, np.ndarray]) -> None:
    """Loads the archive the way the server does and compares it with what was meant."""
    with np.load(out, allow_pickle=False) as npz:
        if sorted(npz.files) != sorted(merged):
            raise SubmissionError(f"written archive has keys {sorted(npz.files)}, expected {sorted(merged)}")
        for name, value in merged.items():
            read = npz[name]
            if read.dtype != value.dtype or read.shape != value.shape or not np.array_equal(read, value):
                raise SubmissionError(f"written archive: key {name!r} does not read back unchanged")


def _write_outputs(
    out: Path,
    sidecar: Path,
    merged: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
    files: Mapping[str, Path],
    overwrite: bool,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    temps: list[Path] = []
    try:
        npz_tmp = temp_beside(out)
        temps.append(npz_tmp)
        with open(npz_tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a name
            np.savez_compressed(handle, **merged)
        _check_written(npz_tmp, merged)
        json_tmp = temp_beside(sidecar)
        temps.append(json_tmp)
        record = dict(provenance, output={"path": str(out.resolve()), "sha256": sha256_file(npz_tmp)})
        json_tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        if not overwrite:  # a file may have appeared while we were validating
            _refuse_existing(out, sidecar)
        os.replace(npz_tmp, out)
        try:
            os.replace(json_tmp, sidecar)
        except OSError:
            out.unlink(missing_ok=True)  # no submission without its provenance
            raise
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


__all__ = [
    "EXPECTED_COUNTS",
    "SPLITS",
    "TASK_KEYS",
    "TOTAL_ENERGY_THRESHOLD_EV",
    "SubmissionError",
    "SubmissionWarning",
    "build_submission",
    "detect_total_energy",
    "merge_splits",
    "read_split",
    "validate_split",
]
