"""Writing and reading fairchem LMDB files: the layout fairchem's ``lmdb`` format reads.

Entries are pickled PyG ``Data`` under ascii integer keys ``"0"``, ``"1"``, ... plus a
pickled ``length``; ``metadata.npz`` beside them holds the atoms per entry, where
fairchem's load-balancing sampler looks for it.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import lmdb
import numpy as np

__all__ = ["LMDB_MAP_SIZE", "close_lmdb", "read_lmdb", "write_lmdb", "write_metadata"]

#: Map size of every LMDB file written here (md17.py sizes its shards against it).
LMDB_MAP_SIZE = 1 << 30


def _lock_file(path: Path) -> Path:
    return path.with_name(path.name + "-lock")


def write_lmdb(data_objects: Iterable, path: str | Path, metadata: bool = True) -> int:
    """Writes entries under keys ``"0"``, ``"1"``, ... plus ``length``; returns the count.

    An existing file at ``path`` is replaced.

    Args:
        data_objects: PyG ``Data`` entries (any iterable; consumed once).
        path: the ``.lmdb`` file to write.
        metadata: also write ``metadata.npz`` (atoms per entry) beside it, where
            fairchem's load-balancing sampler looks for it.
    """
    path = Path(path)
    # Start from an empty file: stale keys beyond the new `length` would linger otherwise.
    path.unlink(missing_ok=True)
    _lock_file(path).unlink(missing_ok=True)
    env = lmdb.open(str(path), subdir=False, map_size=LMDB_MAP_SIZE, meminit=False, map_async=True)
    natoms = []
    try:
        with env.begin(write=True) as txn:
            for data in data_objects:
                txn.put(f"{len(natoms)}".encode("ascii"), pickle.dumps(data, protocol=-1))
                natoms.append(int(data.natoms))
            txn.put("length".encode("ascii"), pickle.dumps(len(natoms), protocol=-1))
        env.sync()  # map_async defers writes; flush before the file is published
    finally:
        env.close()
    # Readers open without locking (fairchem passes lock=False); leave only data.lmdb.
    _lock_file(path).unlink(missing_ok=True)
    if metadata:
        write_metadata(path.parent, natoms)
    return len(natoms)


def write_metadata(folder: str | Path, natoms: Iterable[int]) -> None:
    """``metadata.npz`` (atoms per entry) in ``folder``, where fairchem's load balancing looks for it."""
    np.savez(Path(folder) / "metadata.npz", natoms=np.array(list(natoms), dtype=np.int64))


def close_lmdb(dataset) -> None:
    """Closes the LMDB environments of a fairchem LMDB or ASE-database dataset (no-op for others).

    py-lmdb refuses to open a file twice in one process, so whoever reads a split
    next to a trainer (or twice) must close what it opened.
    """
    while hasattr(dataset, "dataset"):  # fairchem may wrap datasets in a Subset
        dataset = dataset.dataset
    for env in [*getattr(dataset, "envs", []), getattr(dataset, "env", None)]:
        if env is not None:
            env.close()
    for database in getattr(dataset, "dbs", []):  # fairchem's ASE datasets (.aselmdb files)
        if hasattr(database, "close"):
            database.close()


def read_lmdb(folder: str | Path) -> list:
    """Every entry of a fairchem LMDB folder or file, read with fairchem's own dataset."""
    # Imported here: fairchem pulls in torch_geometric and friends, which writers do not need.
    from fairchem.core.datasets.lmdb_dataset import LmdbDataset

    dataset = LmdbDataset({"src": str(folder)})
    try:
        return [dataset[i] for i in range(len(dataset))]
    finally:
        close_lmdb(dataset)
