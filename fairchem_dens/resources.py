"""The files the package ships besides code: the configs and the example trajectory.

They are package data (``fairchem_dens/configs``, ``fairchem_dens/examples``), so a
wheel install has them as well as a checkout (where ``configs/`` and ``examples/`` at
the repository root link to the same folders). ``fairchem-dens configs`` prints where
they are or copies them out.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

__all__ = ["configs_dir", "example_trajectory", "copy_configs"]

EXAMPLE_TRAJECTORY = "ethanol_gfn2xtb_500K.npz"


def _shipped(name: str) -> Path:
    # Installed packages are plain folders (wheels are unpacked), so the resource is a real
    # path that fairchem's config loader and numpy can open.
    path = Path(str(files("fairchem_dens").joinpath(name)))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed fairchem_dens package: reinstall it")
    return path


def configs_dir() -> Path:
    """The shipped configs (``quickstart/``, ``md17/``, ``oc20/``, ...)."""
    return _shipped("configs")


def example_trajectory() -> Path:
    """The shipped GFN2-xTB ethanol trajectory (MD17 sGDML layout, 1500 frames)."""
    return _shipped("examples") / EXAMPLE_TRAJECTORY


def copy_configs(destination: Path, overwrite: bool = False) -> Path:
    """Copies the shipped configs to ``destination`` (refused if it exists, unless ``overwrite``)."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass --overwrite to replace the configs in it")
    # Relative `includes:` stay valid because the tree is copied whole.
    shutil.copytree(configs_dir(), destination, dirs_exist_ok=overwrite, ignore=shutil.ignore_patterns("__pycache__"))
    return destination
