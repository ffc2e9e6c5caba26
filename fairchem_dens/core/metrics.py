"""The denoising metrics as functions of tensors, in physical units.

A DeNS batch reports, over the atoms that count for evaluation:

* ``denoising_<output>_mae`` for each output of role ``original`` (eV for
  ``denoising_energy_mae``): the prediction for the original structure;
* ``denoising_pos_mae`` (Å): the noise predicted on corrupted atoms, ``prediction * sigma_N``,
  against the displacement;
* ``denoising_force_mae`` (eV/Å): the forces predicted on the clean atoms of partially
  corrupted structures.

Each metric is a running ``{"total", "numel", "metric"}`` entry (the layout fairchem's
evaluators use), so batches and ranks add up; an empty set of atoms adds nothing.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from fairchem_dens.core.loss import LOCAL, Reduction
from fairchem_dens.core.roles import ORIGINAL

__all__ = ["FORCE_MAE", "POS_MAE", "accumulate", "aggregate", "denoising_errors", "metric_keys", "original_mae"]

POS_MAE = "denoising_pos_mae"
FORCE_MAE = "denoising_force_mae"


def original_mae(name: str) -> str:
    """Metric of an ``original``-role output in DeNS batches (``denoising_energy_mae``)."""
    return f"denoising_{name}_mae"


def metric_keys(roles: Mapping[str, str]) -> list[str]:
    """Every key a DeNS batch can report, in a fixed order (the same on every rank)."""
    return [*(original_mae(name) for name, role in roles.items() if role == ORIGINAL), POS_MAE, FORCE_MAE]


def denoising_errors(
    noise_prediction: torch.Tensor,
    noise: torch.Tensor,
    target_std: float,
    corrupted: torch.Tensor,
    counted: torch.Tensor,
    forces_prediction: torch.Tensor | None = None,
    forces: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Absolute errors of the ``forces`` output of a DeNS batch, by metric key.

    Args:
        noise_prediction: ``[N, 3]`` the output, normalised (the noise head's units).
        noise: ``[N, 3]`` the displacement, Å.
        target_std: sigma_N, Å (the noise target is ``noise / target_std``).
        corrupted: bool ``[N]``.
        counted: bool ``[N]``, atoms that count for evaluation.
        forces_prediction: ``[N, 3]`` the output in eV/Å (denormalised); needed when a
            counted atom is clean.
        forces: ``[N, 3]`` force labels, eV/Å.
    """
    errors = {POS_MAE: (noise_prediction * target_std - noise.to(noise_prediction)).abs()[corrupted & counted]}
    clean = ~corrupted & counted
    if bool(clean.any()):
        errors[FORCE_MAE] = (forces_prediction - forces.to(forces_prediction)).abs()[clean]
    return errors


def accumulate(metrics: dict[str, Any], key: str, errors: torch.Tensor) -> dict[str, Any]:
    """Adds absolute errors to the running mean ``metrics[key]``; nothing for an empty set."""
    if errors.numel() == 0:
        return metrics
    total = float(errors.sum()) + metrics.get(key, {}).get("total", 0.0)
    numel = errors.numel() + metrics.get(key, {}).get("numel", 0)
    metrics[key] = {"total": total, "numel": numel, "metric": total / numel}
    return metrics


def aggregate(metrics: Mapping[str, Any], keys: Iterable[str], ranks: Reduction = LOCAL) -> dict[str, Any]:
    """Running means summed over ranks, over a fixed key list.

    Every rank reduces the same keys in the same order, whatever its batches held; a key
    with nothing counted on any rank is dropped everywhere.
    """
    keys = list(keys)
    local = torch.tensor(
        [[float(metrics.get(k, {}).get("total", 0.0)), float(metrics.get(k, {}).get("numel", 0))] for k in keys],
        dtype=torch.float64,
    ).view(-1, 2)
    summed = ranks.sum_over_ranks(local)
    aggregated = {}
    for key, (total, numel) in zip(keys, summed.tolist()):
        if numel > 0:
            aggregated[key] = {"total": total, "numel": int(numel), "metric": total / numel}
    return aggregated
