"""The data-dependent numbers of the fairchem-2 bulk recipes, fitted on a training split.

* ``elem_refs``: linear per-element energy references (eV, indexed by atomic number, 100
  entries), fitted by least squares with fairchem's own ``compute_lin_ref``, the fit its
  fine-tuning data script makes; the model then learns the energy left after them.
* ``energy_rmsd``: the root mean square of the energy per atom left after the references
  (eV/atom), the scale of what the energy head learns.
* ``force_rmsd``: the root mean square of the free atoms' force components (eV/Å).
* ``stress_rmsd``: the root mean square of the stress components (eV/Å³).

::

    fairchem-dens fit-normalizers DATA/train      # prints: 'elem_refs=[...]' energy_rmsd=... force_rmsd=... stress_rmsd=...
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import numpy as np

__all__ = ["fit_normalizers", "overrides"]


def _database_files(split: Path) -> list[Path]:
    files = [split] if split.is_file() else sorted(p for p in split.glob("*") if p.suffix in (".aselmdb", ".db"))
    if not files:
        raise FileNotFoundError(f"{split}: no .aselmdb or .db file (give a split folder or a database file)")
    return files


def fit_normalizers(split: str | Path) -> dict:
    """``{"elem_refs": [...], "energy_rmsd", "force_rmsd", "stress_rmsd"}`` of a training split."""
    import ase.db
    from ase.constraints import FixAtoms
    from fairchem.core.scripts.create_finetune_dataset import compute_lin_ref

    numbers, energies, free_forces, stresses = [], [], [], []
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
                if "stress" in row:
                    stresses.append(np.asarray(row.stress))
    if not energies:
        raise ValueError(f"{split}: the database holds no structures")
    refs = np.asarray(compute_lin_ref(numbers, energies))
    residual_per_atom = [(energy - refs[z].sum()) / len(z) for z, energy in zip(numbers, energies)]
    rmsd = {"energy_rmsd": float(np.sqrt(np.mean(np.square(residual_per_atom)))),
            "force_rmsd": float(np.sqrt(np.mean(np.square(np.concatenate(free_forces)))))}
    # a split without stress gets 1.0: the recipes' stress normalizer must still be a number
    rmsd["stress_rmsd"] = float(np.sqrt(np.mean(np.square(np.concatenate(stresses))))) if stresses else 1.0
    for name, value in rmsd.items():
        if not value > 0:
            raise ValueError(f"{split}: {name} is {value}; the recipes divide by it")
    return {"elem_refs": [float(c) for c in refs], **rmsd}


def overrides(fitted: dict) -> list[str]:
    """The fitted numbers as ``fairchem -c`` command-line overrides."""
    refs = ",".join(f"{value:.10g}" for value in fitted["elem_refs"])
    return [f"elem_refs=[{refs}]", *(f"{key}={fitted[key]:.6g}" for key in ("energy_rmsd", "force_rmsd", "stress_rmsd"))]


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
