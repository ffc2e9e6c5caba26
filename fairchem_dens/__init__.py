"""fairchem-dens: DeNS (Denoising Non-Equilibrium Structures) for fairchem-core 1.x.

Importing the package checks the installed fairchem-core. Models, trainer and
datasets register themselves with fairchem's registry when their modules are
imported; shipped configs name them by dotted path, so a fresh ``fairchem``
process (or a SLURM job) finds them without importing anything first.
"""

from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"

REQUIRED_FAIRCHEM = "1.10.0"


class FairchemVersionError(ImportError):
    """The installed fairchem-core is not the one this plugin was built for."""


def _check_fairchem() -> None:
    try:
        installed = metadata.version("fairchem-core")
    except metadata.PackageNotFoundError as error:
        raise FairchemVersionError(
            f"fairchem-dens needs fairchem-core=={REQUIRED_FAIRCHEM}, which is not "
            f"installed: pip install fairchem-core=={REQUIRED_FAIRCHEM}"
        ) from error
    if installed != REQUIRED_FAIRCHEM:
        raise FairchemVersionError(
            f"fairchem-dens needs fairchem-core=={REQUIRED_FAIRCHEM} (the last 1.x "
            f"release, whose EquiformerV2 modules and trainer API it builds on); "
            f"found fairchem-core=={installed}. Install the pinned version: "
            f"pip install fairchem-core=={REQUIRED_FAIRCHEM}"
        )


_check_fairchem()

from fairchem_dens.core.settings import DeNSConfig, DeNSConfigError  # noqa: E402

__all__ = ["__version__", "DeNSConfig", "DeNSConfigError", "FairchemVersionError"]
