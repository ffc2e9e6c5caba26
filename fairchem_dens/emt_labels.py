"""EMT labels frozen onto a structure: the one labelling of the built-in example data sets.

ASE only (no fairchem), so the fairchem-1.10 examples (:mod:`fairchem_dens.datasets.emt_bulk`)
and the fairchem-2 ones (:mod:`fairchem_dens.fairchem2.emt_data`) label the same way.
"""

from __future__ import annotations

from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

__all__ = ["emt_labelled"]


def emt_labelled(atoms: Atoms, voigt_stress: bool = True) -> Atoms:
    """A copy of ``atoms`` with EMT's energy, forces (constraints not applied) and stress in a single-point calculator."""
    frame = atoms.copy()
    frame.calc = EMT()
    results = {
        "energy": frame.get_potential_energy(),
        "forces": frame.get_forces(apply_constraint=False),
        "stress": frame.get_stress(voigt=voigt_stress),
    }
    frame.calc = SinglePointCalculator(frame, **results)
    return frame
