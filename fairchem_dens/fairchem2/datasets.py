"""fairchem 2's ASE-database dataset with each structure's ``md`` flag, for ``relaxation_only``.

fairchem 2 turns an ``Atoms`` into ``AtomicData`` with ``AtomicData.from_ase``, which keeps
energy, forces, stress, charge and spin but no other key of ``atoms.info``; its dataset
transforms see only the result. :class:`DeNSAseDBDataset` adds the flag the DeNS
``relaxation_only`` setting reads (1 for an MD frame, 0 for a relaxation frame) as
``data.md``, taken from ``atoms.info["md"]``, where fairchem 2's ASE datasets put a database
row's data (``db.write(atoms, data={"md": 1})``; ``make-emt-data --bulk`` writes it). A
structure without the flag is refused, naming it. Use it as the dataset's format::

    dataset_configs:
      emt:
        format: fairchem_dens.fairchem2.datasets.DeNSAseDBDataset
        splits: {train: {src: [DATA/train/data.aselmdb]}}
        a2g_args: {r_energy: True, r_forces: True}
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from ase import Atoms
from fairchem.core.datasets.ase_datasets import AseDBDataset

from fairchem_dens.core.errors import DeNSConfigError

__all__ = ["MD_FLAG", "DeNSAseDBDataset"]

MD_FLAG = "md"


def _with_md_flag(to_atomic_data: Callable[..., Any], atoms: Atoms, **kwargs: Any) -> Any:
    data = to_atomic_data(atoms, **kwargs)
    flag = atoms.info.get(MD_FLAG)
    if flag not in (0, 1, True, False):
        raise DeNSConfigError(
            f"structure {kwargs.get('sid', '?')} ({atoms.get_chemical_formula()}) has "
            f"{'no `md` flag' if flag is None else f'md={flag!r}'}: DeNSAseDBDataset needs md 0 (relaxation "
            "frame) or 1 (MD frame) in each row's data (db.write(atoms, data={'md': 0 or 1}))"
        )
    data[MD_FLAG] = torch.tensor([int(flag)], dtype=torch.long)
    return data


class DeNSAseDBDataset(AseDBDataset):
    """fairchem 2's ``AseDBDataset``; each structure also carries its ``md`` flag (``data.md``, shape [1])."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.a2g = partial(_with_md_flag, self.a2g)
