"""Every exception class of fairchem-dens subclasses FairchemDensError (and keeps its builtin base).

The classes are found by importing every module of the package, so a new error class
without the base fails here. ``fairchem_dens.fairchem2`` needs fairchem 2 and another
environment; warnings are not refusals and keep only their Warning base.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import fairchem_dens
from fairchem_dens.errors import FairchemDensError

SKIPPED = ("fairchem_dens.fairchem2",)

# Each with the builtin base code written against it catches (docs/refusals.md).
KNOWN = {
    "fairchem_dens.core.errors.DeNSConfigError": ValueError,
    "fairchem_dens.core.errors.DeNSSetupError": ValueError,
    "fairchem_dens.core.errors.NonFiniteLossError": FloatingPointError,
    "fairchem_dens.versions.FairchemVersionError": ImportError,
    "fairchem_dens.submission.SubmissionError": ValueError,
    "fairchem_dens.slurm.SubmitError": Exception,
    "fairchem_dens.trainers.labels.NonFiniteLabelError": ValueError,
    "fairchem_dens.datasets.lmdb_dataset.LmdbDataError": ValueError,
    "fairchem_dens.datasets.lmdb_dataset.MDFlagError": ValueError,
    "fairchem_dens.datasets.metadata.MetadataError": ValueError,
    "fairchem_dens.datasets.md17.MD17FormatError": ValueError,
    "fairchem_dens.models.checkpoints.CheckpointMismatchError": ValueError,
    "fairchem_dens.models.checkpoints.CheckpointReadError": ValueError,
}


def _modules() -> list[str]:
    names = [fairchem_dens.__name__]
    for info in pkgutil.walk_packages(fairchem_dens.__path__, prefix="fairchem_dens."):
        if not info.name.startswith(SKIPPED):
            names.append(info.name)
    return names


def _exception_classes() -> dict[str, type]:
    found = {}
    for name in _modules():
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if (
                inspect.isclass(cls)
                and issubclass(cls, BaseException)
                and not issubclass(cls, Warning)
                and cls.__module__ == name
                and cls is not FairchemDensError
            ):
                found[f"{name}.{cls.__qualname__}"] = cls
    return found


def test_every_exception_class_subclasses_fairchem_dens_error():
    found = _exception_classes()
    assert set(KNOWN) <= set(found), f"not found by the walk: {sorted(set(KNOWN) - set(found))}"
    without = sorted(name for name, cls in found.items() if not issubclass(cls, FairchemDensError))
    assert without == [], f"add FairchemDensError to the bases of {without} (fairchem_dens/errors.py)"


def test_each_keeps_its_builtin_base():
    found = _exception_classes()
    lost = sorted(name for name, base in KNOWN.items() if not issubclass(found[name], base))
    assert lost == []
