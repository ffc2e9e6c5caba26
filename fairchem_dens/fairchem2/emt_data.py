"""Tiny labelled bulk data for the fairchem-2 configs and tests, in fairchem 2's ``.aselmdb`` format.

Rattled fcc cells (4 and 8 atoms) of metals ASE's EMT calculator knows, each with
EMT's energy, forces and stress in a single-point calculator; one cell in four holds
its first atom fixed (``FixAtoms``), so the fixed-atom rules are exercised, and one in three is
flagged as an MD frame (``md`` 1 in the row's data, for ``relaxation_only``).
fairchem 2 reads the files with ``format: ase_db`` (``AseDBDataset``)::

    python -m fairchem_dens.fairchem2.emt_data OUT      # OUT/train/data.aselmdb, OUT/val/data.aselmdb
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.db
import numpy as np
from ase.build import bulk
from ase.constraints import FixAtoms

from fairchem_dens.emt_labels import emt_labelled

__all__ = ["METALS", "SPLITS", "emt_structures", "write_emt_aselmdb"]

METALS = ("Cu", "Pt", "Ni", "Al", "Ag")
#: Structures per split of the default data.
SPLITS = {"train": 16, "val": 4}
RATTLE_STD = 0.08  # Å: forces of a few eV/Å, like a relaxation's early frames


def emt_structures(count: int, seed: int) -> list:
    """``count`` labelled cells (energy in eV, forces eV/Å, stress eV/Å³)."""
    rng = np.random.default_rng(seed)
    structures = []
    for index in range(count):
        atoms = bulk(METALS[index % len(METALS)], "fcc", cubic=True)
        if index % 2:
            atoms = atoms.repeat((2, 1, 1))
        atoms.positions += rng.normal(0.0, RATTLE_STD, size=atoms.positions.shape)
        if index % 4 == 3:
            atoms.set_constraint(FixAtoms(indices=[0]))
        structures.append(emt_labelled(atoms, voigt_stress=False))
    return structures


def write_emt_aselmdb(root: str | Path, splits: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Writes ``root/<split>/data.aselmdb`` for each split (default :data:`SPLITS`); returns ``root``."""
    root = Path(root)
    for offset, (split, count) in enumerate((splits or SPLITS).items()):
        path = root / split / "data.aselmdb"
        if path.exists():
            raise FileExistsError(f"{path} exists: pick an empty folder for the EMT data")
        path.parent.mkdir(parents=True, exist_ok=True)
        with ase.db.connect(str(path)) as db:
            for index, atoms in enumerate(emt_structures(count, seed + 1000 * offset)):
                db.write(atoms, data={"md": int(index % 3 == 1)})
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output folder (gets train/ and val/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_emt_aselmdb(args.root, seed=args.seed))


if __name__ == "__main__":
    main()
