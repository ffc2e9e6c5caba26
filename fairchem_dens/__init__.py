"""fairchem-dens: DeNS (Denoising Non-Equilibrium Structures) for fairchem.

:mod:`fairchem_dens.core` holds the DeNS rules and imports no fairchem. The fairchem-1.10
integration (``models``, ``trainers``, ``datasets``) registers its models, trainer and
datasets with fairchem's registry when imported; shipped configs name them by dotted path,
so a fresh ``fairchem`` process (or a SLURM job) finds them without importing anything
first. Each integration checks the installed fairchem-core when imported
(:mod:`fairchem_dens.versions`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from fairchem_dens.core.settings import DeNSConfig, DeNSConfigError  # noqa: E402

__all__ = ["__version__", "DeNSConfig", "DeNSConfigError"]
