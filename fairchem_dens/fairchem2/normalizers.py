"""The data-dependent numbers of the fairchem-2 bulk recipes, fitted on a training split.

* ``elem_refs``: linear per-element energy references (eV, indexed by atomic number, 100
  entries), fitted by least squares with fairchem's own ``compute_lin_ref``, the fit its
  fine-tuning data script makes (exactly 0 for elements the data lacks); the model then learns
  the energy left after them.
* ``normalizer_rmsd``: the root mean square of the free atoms' force components (eV/Å), the one
  scale of energy, forces and stress (fairchem's fine-tuning template's; a conservative model's
  forces and stress are derivatives of its energy, so the three share it).

::

    fairchem-dens fit-normalizers DATA/train      # prints: 'elem_refs=[...]' normalizer_rmsd=...
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import numpy as np

from fairchem_dens.fairchem2.predict import database_files

__all__ = ["fit_normalizers", "overrides"]


def _database_files(split: Path) -> list[Path]:
    files = database_files(split)
    if not files:
        raise FileNotFoundError(f"{split}: no .aselmdb or .db file (give a split folder or a database file)")
    return files


def fit_normalizers(split: str | Path) -> dict:
    """``{"elem_refs": [...], "normalizer_rmsd": float}`` of a training split."""
    import ase.db
    from ase.constraints import FixAtoms
    from fairchem.core.scripts.create_finetune_dataset import compute_lin_ref

    numbers, energies, free_forces = [], [], []
    for path in _database_files(Path(split)):
        with ase.db.connect(str(path)) as database:
            for row in database.select():
                atoms = row.toatoms()
                fixed = np.zeros(len(atoms), dtype=bool)
                for constraint in atoms.constraints:
                    if isinstance(constraint, FixAtoms):
                        fixed[constraint.index] = True
                numbers.append(atoms.numbers)
                energies.append(atoms.get_potential_energy())
                free_forces.append(atoms.get_forces()[~fixed])
    if not energies:
        raise ValueError(f"{split}: the database holds no structures")
    rmsd = float(np.sqrt(np.mean(np.square(np.concatenate(free_forces)))))
    if not rmsd > 0:
        raise ValueError(f"{split}: the forces' root mean square is {rmsd}; the recipes divide by it")
    references = np.asarray(compute_lin_ref(numbers, energies), dtype=np.float64)
    # an element the data lacks has an all-zero column in the fit: its least-squares reference is
    # round-off (~1e-19), which 0 means
    present = np.zeros(len(references), dtype=bool)
    present[np.unique(np.concatenate(numbers))] = True
    references[~present] = 0.0
    return {"elem_refs": [float(c) for c in references], "normalizer_rmsd": rmsd}


def overrides(fitted: dict) -> list[str]:
    """The fitted numbers as ``fairchem -c`` command-line overrides."""
    refs = ",".join(f"{value:.10g}" for value in fitted["elem_refs"])
    return [f"elem_refs=[{refs}]", f"normalizer_rmsd={fitted['normalizer_rmsd']:.6g}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairchem-dens fit-normalizers", description=__doc__.splitlines()[0])
    parser.add_argument("split", help="training split: a folder of .aselmdb / .db files, or one such file")
    args = parser.parse_args(argv)
    try:
        fitted = fit_normalizers(args.split)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"fit-normalizers: {error}") from error
    print(" ".join(shlex.quote(item) for item in overrides(fitted)))
    return 0
