"""Helpers shared by the test suite and the benchmarks: tiny models, batches, rotations, trainers.

Kept in the package (like e3nn's equivariance checkers and NequIP's test mixins) so that a
new backbone's tests and the benchmark scripts reuse one definition of "tiny model",
"rotated batch" and "DeNS batch", one set of float32 tolerances and one backbone suite:

- :mod:`~fairchem_dens.testing.models`: tiny model configs of every backbone, ``build_model``, ``forward_seeded``;
- :mod:`~fairchem_dens.testing.batches`: the fixture batch, rotations, batches corrupted by the trainer's code;
- :mod:`~fairchem_dens.testing.trainer`: a trainer built by fairchem's CLI path, config and LMDB variants;
- :mod:`~fairchem_dens.testing.tolerances`: every floating-point tolerance, from float32 arithmetic;
- :mod:`~fairchem_dens.testing.backbone_suite`: the tests every DeNS backbone adapter passes.

The names below are imported on first use, so that ``fairchem_dens.testing.tolerances``
imports under any fairchem (the trainer helpers need the fairchem-1.10 integration).
"""

from __future__ import annotations

import importlib

#: Each public name and the submodule that defines it.
_HOMES = {
    **dict.fromkeys(
        [
            "TINY_EQV2_BACKBONE",
            "TINY_ESCN_BACKBONE",
            "TINY_ESEN_BACKBONE",
            "eqv2_dens_model_config",
            "escn_dens_model_config",
            "esen_dens_model_config",
            "build_model",
            "forward_seeded",
        ],
        "models",
    ),
    **dict.fromkeys(
        [
            "batch_from_tensors",
            "rotation_matrix",
            "rotate_batch",
            "corrupt_like_trainer",
            "dens_mode_batch",
            "mixed_dens_batch",
        ],
        "batches",
    ),
    **dict.fromkeys(["fairchem_trainer", "write_variant", "lmdb_without", "read_lmdb", "close_lmdb"], "trainer"),
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
