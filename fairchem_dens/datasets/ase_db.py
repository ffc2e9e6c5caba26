"""fairchem's ``ase_db`` dataset, reading ``.aselmdb`` files (MPtrj, OMat24) with ASE < 3.25.

fairchem 1.10 opens every database with ``ase.db.connect``. ``.aselmdb`` files
(ASE databases stored in LMDB, the format of OMat24 and fairchem's MPtrj) are
known to ``ase.db.connect`` only through the database plugins of ASE >= 3.25,
while fairchem 1.10's batch relaxations need ASE < 3.25. This subclass opens
``.aselmdb`` files with the backend class of the ``ase-db-backends`` package
directly, so both work in one environment; every other database goes through
fairchem unchanged.

Use it as a dataset ``format``::

    dataset:
      train:
        format: fairchem_dens.datasets.ase_db.DeNSAseDBDataset
        src: /data/omat24/train/rattled-300-subsampled
        a2g_args: {r_energy: True, r_forces: True, r_stress: True}
"""

from __future__ import annotations

from pathlib import Path

import ase.db

from fairchem_dens.versions import require_fairchem

require_fairchem("fairchem1", "fairchem_dens.datasets (the fairchem-1.10 integration)")

from fairchem.core.common.registry import registry  # noqa: E402 (after the version gate)
from fairchem.core.datasets.ase_datasets import AseDBDataset  # noqa: E402 (after the version gate)

__all__ = ["DeNSAseDBDataset"]


@registry.register_dataset("fairchem_dens_ase_db")
class DeNSAseDBDataset(AseDBDataset):
    """fairchem's ``AseDBDataset``; ``.aselmdb`` files open through ``ase_db_backends``."""

    @staticmethod
    def connect_db(address: str | Path, connect_args: dict | None = None):
        if not str(address).endswith(".aselmdb"):
            # fairchem adds LMDB-only arguments when "aselmdb" occurs anywhere in the path
            # (a folder name too), which breaks every other file there (e.g. metadata.npz,
            # which must then be skipped as "not an ASE database").
            return ase.db.connect(address, **(connect_args or {}))
        from ase_db_backends.aselmdb import LMDBDatabase

        # Read-only and without ASE's lock file, as fairchem opens them (many readers).
        args = {**(connect_args or {}), "readonly": True, "use_lock_file": False}
        return LMDBDatabase(address, **args)
