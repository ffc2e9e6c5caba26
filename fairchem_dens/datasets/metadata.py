"""``metadata.npz`` (atoms per entry) for fairchem's load balancing, for any dataset it reads.

Every shipped config sets ``optim.load_balancing: atoms``: fairchem's
``BalancedBatchSampler`` then reads each entry's atom count from ``metadata.npz``,
``SRC/metadata.npz`` for a folder ``SRC`` and the file's folder for a file
(``BaseDataset._metadata``), and stops the run without it. Our converters write it;
this module writes it for data made elsewhere: multi-frame extxyz (``ase_read_multi``),
ASE databases (``.db``, ``.aselmdb``) and LMDBs. The counts come from the dataset class
training will use, opened on the same ``src`` (and ``pattern``), so their order is its order.
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np

from fairchem_dens.datasets.lmdb_io import write_metadata
from fairchem_dens.errors import FairchemDensError

__all__ = ["ASE_DB", "MetadataError", "dataset_natoms", "detect_format", "metadata_path", "write_dataset_metadata"]

#: fairchem's ``ase_db`` reader that also opens ``.aselmdb`` files with ASE < 3.25.
ASE_DB = "fairchem_dens.datasets.ase_db.DeNSAseDBDataset"
_LMDB_SUFFIXES = {".lmdb"}
_ASE_DB_SUFFIXES = {".db", ".aselmdb"}
_ASE_READ_SUFFIXES = {".extxyz", ".xyz", ".traj"}


class MetadataError(FairchemDensError, ValueError):
    """The data cannot be given a ``metadata.npz`` (unknown format, shared folder, existing file)."""


def metadata_path(src: Path) -> Path:
    """Where fairchem 1.10 looks for the ``metadata.npz`` of ``src``."""
    return src.parent / "metadata.npz" if src.is_file() else src / "metadata.npz"


def detect_format(src: Path) -> tuple[str, str | None]:
    """``(format, pattern)`` of ``src`` from its file names; pattern only for ``ase_read_multi``."""
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    suffixes = {p.suffix for p in files}
    if suffixes & _LMDB_SUFFIXES:
        return "lmdb", None
    if suffixes & _ASE_DB_SUFFIXES:
        return ASE_DB, None
    readable = sorted(suffixes & _ASE_READ_SUFFIXES)
    if src.is_dir() and readable:
        return "ase_read_multi", f"*{readable[0]}" if len(readable) == 1 else "*"
    raise MetadataError(
        f"cannot tell the dataset format of {src} (file suffixes: {', '.join(sorted(suffixes)) or 'none'}): "
        "expected a folder of .extxyz/.xyz/.traj files (ase_read_multi), .db/.aselmdb ASE databases or "
        ".lmdb files; pass --format"
    )


def dataset_natoms(dataset) -> np.ndarray:
    """Atoms of every entry of a fairchem dataset, in its order."""
    from fairchem.core.datasets.ase_datasets import AseAtomsDataset, AseReadMultiStructureDataset

    if isinstance(dataset, AseReadMultiStructureDataset):
        # Its ids are "FILE INDEX"; read each file once, not once per frame as get_atoms does.
        frames: dict[str, list[int]] = {}
        natoms = []
        for identifier in dataset.ids:
            filename, index = identifier.rsplit(" ", 1)
            if filename not in frames:
                frames[filename] = [len(atoms) for atoms in ase.io.read(filename, **dataset.ase_read_args)]
            natoms.append(frames[filename][int(index)])
        return np.array(natoms, dtype=np.int64)
    if isinstance(dataset, AseAtomsDataset):
        return np.array([len(dataset.get_atoms(identifier)) for identifier in dataset.ids], dtype=np.int64)
    return np.array([int(dataset[i].natoms) for i in range(len(dataset))], dtype=np.int64)


def _refuse_shared_folder(src: Path) -> None:
    """A file's metadata lives in its folder: another data file there would be given the same one."""
    if not src.is_file():
        return
    others = sorted(p.name for p in src.parent.iterdir() if p.suffix == src.suffix and p != src)
    if others:
        raise MetadataError(
            f"{src} is a file, so fairchem reads its metadata from {metadata_path(src)}, which would also be "
            f"read for {', '.join(others)} there: give each split a folder of its own"
        )


def write_dataset_metadata(
    src: str | Path, dataset_format: str | None = None, pattern: str | None = None, overwrite: bool = False
) -> tuple[Path, np.ndarray, str]:
    """Writes the ``metadata.npz`` of ``src``; returns its path, the atom counts and the format read.

    Args:
        src: the dataset's ``src``, as the config gives it.
        dataset_format: the config's ``format`` (default: from the file names, see :func:`detect_format`).
        pattern: ``ase_read_multi``'s ``pattern``, as the config gives it (default: the detected suffix).
        overwrite: replace an existing ``metadata.npz``.
    """
    from fairchem.core.common.registry import registry

    src = Path(src)
    if not src.exists():
        raise MetadataError(f"{src} does not exist")
    target = metadata_path(src)
    if target.exists() and not overwrite:
        raise MetadataError(f"{target} exists; pass --overwrite to replace it")
    _refuse_shared_folder(src)
    detected, detected_pattern = detect_format(src) if dataset_format is None else (dataset_format, None)
    dataset_format = ASE_DB if detected == "ase_db" else detected  # ours also opens .aselmdb
    config: dict = {"src": str(src), "use_tqdm": False}
    if pattern or detected_pattern:
        config["pattern"] = pattern or detected_pattern
    try:
        dataset = registry.get_dataset_class(dataset_format)(config)
        natoms = dataset_natoms(dataset)
    except (ValueError, AssertionError, RuntimeError, OSError) as error:
        raise MetadataError(f"cannot read {src} as {dataset_format} {config}: {error}") from error
    if len(natoms) == 0:
        raise MetadataError(f"{src} read as {dataset_format} {config} has no entries")
    write_metadata(target.parent, natoms)
    return target, natoms, dataset_format
