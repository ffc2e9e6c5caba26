"""The names of the model outputs DeNS treats specially: one home for models and trainers alike."""

from __future__ import annotations

__all__ = ["ENERGY", "FORCES", "GRADIENT_OUTPUTS", "STRESS"]

ENERGY = "energy"
#: The output that holds the noise prediction on corrupted atoms.
FORCES = "forces"
STRESS = "stress"
#: Outputs a conservative head derives from the energy: -dE/dx and virial / volume.
GRADIENT_OUTPUTS = (FORCES, STRESS)
