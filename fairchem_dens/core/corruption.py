"""The DeNS corruption: pure, seeded sampling functions of a batch's tensors.

Nothing here imports fairchem, so the statistics of DeNS can be unit-tested
without a model. Every random draw takes an explicit ``torch.Generator`` built by
:func:`step_generator` from ``(seed, step, stream)``: the batch-level decision
uses a stream that does not depend on the rank, so every DDP rank takes the
same branch at the same step, and a job resumed from a checkpoint draws the
same numbers it would have drawn without the interruption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fairchem_dens.core.settings import DeNSConfig, DeNSConfigError

__all__ = [
    "DECISION_STREAM",
    "NOISE_STREAM",
    "TRAINING_STREAMS",
    "VALIDATION_STREAMS",
    "SKIP_FILTERS",
    "Corruption",
    "require_md",
    "require_stress",
    "step_generator",
    "sigma_ladder",
    "select_structures",
    "corruption_mask",
    "sample_sigmas",
    "sample_corruption",
    "structures_allowed",
    "skip_filter_values",
    "passes_skip_filter",
    "eligible_atoms",
    "structures_over_ratio",
]

# Distinct integers keep the random streams of one step independent: a (decision,
# noise) pair for training steps, another for the denoising validation passes.
DECISION_STREAM = 0
NOISE_STREAM = 1
VALIDATION_STREAM = 2
VALIDATION_NOISE_STREAM = 102
TRAINING_STREAMS = (DECISION_STREAM, NOISE_STREAM)
VALIDATION_STREAMS = (VALIDATION_STREAM, VALIDATION_NOISE_STREAM)


def step_generator(seed: int, step: int, stream: int, rank: int = 0) -> torch.Generator:
    """A CPU generator determined by ``(seed, step, stream, rank)`` alone.

    Args:
        seed: the run's seed (``--seed``).
        step: the global training step.
        stream: which draw (:data:`DECISION_STREAM`, :data:`NOISE_STREAM`, ...).
        rank: the DDP rank; pass 0 for draws every rank must agree on.
    """
    entropy = [int(seed) & 0xFFFFFFFF, int(step), int(stream), int(rank)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sigma_ladder(std_low: float, std_high: float, num_steps: int) -> torch.Tensor:
    """Geometric sigma ladder, both ends included (float32), as in the paper."""
    return torch.exp(torch.linspace(math.log(std_low), math.log(std_high), num_steps)).to(torch.float32)


def select_structures(
    config: DeNSConfig,
    num_structures: int,
    decision_gen: torch.Generator,
    md: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which structures of a batch are corrupted.

    Args:
        config: the DeNS settings.
        num_structures: structures in the (local) batch.
        decision_gen: generator; for ``selection: batch`` it must be the same on
            every rank (see :func:`step_generator`).
        md: per-structure 0/1 MD flag; MD frames are excluded when
            ``relaxation_only`` is set.

    Returns:
        Bool tensor ``[num_structures]``.
    """
    if not config.enabled or config.prob <= 0.0:
        selected = torch.zeros(num_structures, dtype=torch.bool)
    elif config.selection == "batch":
        corrupt = bool(torch.rand((), generator=decision_gen) < config.prob)
        selected = torch.full((num_structures,), corrupt, dtype=torch.bool)
    else:
        selected = torch.rand(num_structures, generator=decision_gen) < config.prob
    if config.relaxation_only:
        require_md(config, md, "the batch")
        selected = selected & (md.view(-1).to(torch.long) == 0)
    return selected


def require_md(config: DeNSConfig, md: Any, where: str) -> None:
    """Refuses ``relaxation_only`` without MD flags; ``where`` names the data ("the batch", a dataset)."""
    if config.relaxation_only and md is None:
        raise DeNSConfigError(
            f"optim.denoising_pos_params.relaxation_only is set but {where} gives no `md` flag: on fairchem "
            "1.10 use fairchem_dens.datasets.lmdb_dataset.DeNSLmdbDataset or store `md` in the entries; on "
            "fairchem 2 set the dataset's format to fairchem_dens.fairchem2.datasets.DeNSAseDBDataset."
        )


def require_stress(config: DeNSConfig, stress: Any, where: str) -> None:
    """Refuses ``max_stress_norm`` without stress; ``where`` names the data ("the batch", a dataset)."""
    if config.max_stress_norm is not None and stress is None:
        raise DeNSConfigError(
            f"optim.denoising_pos_params.max_stress_norm is set but {where} has no `stress`: "
            "read it with a2g_args: {r_stress: True} or drop the filter."
        )


#: The skip filters: the per-structure quantity each compares with its limit, and its unit.
SKIP_FILTERS = {
    "min_num_atoms": ("atoms", ""),
    "max_force_norm": ("max |F_i|", " eV/Å"),
    "max_mean_force_norm": ("|Σ_i F_i|", " eV/Å"),
    "max_stress_norm": ("stress norm", " eV/Å³"),
}


def skip_filter_values(
    config: DeNSConfig,
    batch_index: torch.Tensor,
    num_structures: int,
    forces: torch.Tensor | None = None,
    stress: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The per-structure quantity ``[B]`` of each skip filter the config sets, by key.

    Args:
        config: the DeNS settings.
        batch_index: ``[N]`` structure of each atom.
        num_structures: structures in the batch.
        forces: ``[N, 3]`` forces (needed by the force filters).
        stress: ``[B, 3, 3]`` or ``[B, 9]`` stress (needed by ``max_stress_norm``).
    """
    values = {}
    if config.min_num_atoms is not None:
        values["min_num_atoms"] = torch.bincount(batch_index, minlength=num_structures)
    if config.max_force_norm is not None or config.max_mean_force_norm is not None:
        if forces is None:
            raise DeNSConfigError("the force skip filters need the batch's `forces`")
        forces = forces.detach().cpu().float()
        if config.max_force_norm is not None:
            values["max_force_norm"] = torch.zeros(num_structures).scatter_reduce(
                0, batch_index, forces.norm(dim=-1), reduce="amax", include_self=True
            )
        if config.max_mean_force_norm is not None:
            values["max_mean_force_norm"] = (
                torch.zeros(num_structures, 3).index_add_(0, batch_index, forces).norm(dim=-1)
            )
    if config.max_stress_norm is not None:
        require_stress(config, stress, "the batch")
        values["max_stress_norm"] = stress.detach().cpu().float().reshape(num_structures, -1).norm(dim=-1)
    return values


def passes_skip_filter(config: DeNSConfig, key: str, values: torch.Tensor) -> torch.Tensor:
    """Bool: structures whose quantity ``values`` the filter ``key`` lets through."""
    limit = getattr(config, key)
    return values >= limit if key == "min_num_atoms" else values <= limit


def structures_allowed(
    config: DeNSConfig,
    batch_index: torch.Tensor,
    num_structures: int,
    forces: torch.Tensor | None = None,
    stress: torch.Tensor | None = None,
) -> torch.Tensor:
    """Structures the skip filters let through (EquiformerV3's filters), bool ``[B]``.

    Deterministic functions of the labels: they draw nothing, so the random
    streams (and a resumed job's draws) are the same with or without them.
    Arguments as for :func:`skip_filter_values`.
    """
    allowed = torch.ones(num_structures, dtype=torch.bool)
    for key, values in skip_filter_values(config, batch_index, num_structures, forces, stress).items():
        allowed &= passes_skip_filter(config, key, values)
    return allowed


def structures_over_ratio(
    config: DeNSConfig, mask: torch.Tensor, eligible: torch.Tensor, batch_index: torch.Tensor, num_structures: int
) -> torch.Tensor:
    """``strict_max_ratio``: bool ``[B]``, structures whose drawn corrupted fraction exceeds it."""
    if config.strict_max_ratio is None:
        return torch.zeros(num_structures, dtype=torch.bool)
    corrupted = torch.zeros(num_structures).index_add_(0, batch_index, mask.float())
    eligible_count = torch.zeros(num_structures).index_add_(0, batch_index, eligible.float())
    return corrupted > config.strict_max_ratio * eligible_count


def eligible_atoms(
    config: DeNSConfig, selected: torch.Tensor, batch_index: torch.Tensor, fixed: torch.Tensor
) -> torch.Tensor:
    """Atoms of selected structures that may be corrupted: the free ones, or all with ``all_atoms``."""
    eligible = selected[batch_index]
    if not config.all_atoms:
        eligible = eligible & (fixed.view(-1) == 0)
    return eligible


def corruption_mask(
    config: DeNSConfig,
    selected: torch.Tensor,
    batch_index: torch.Tensor,
    fixed: torch.Tensor,
    noise_gen: torch.Generator,
) -> torch.Tensor:
    """Per-atom corruption mask.

    An atom is corrupted when its structure is selected, it is free (or
    ``all_atoms`` is set), and, with ``corrupt_ratio``, a uniform draw falls
    below the ratio. Fixed atoms are never corrupted otherwise (docs/algorithm.md#fixed-atoms).

    Returns:
        Bool tensor ``[N]``.
    """
    mask = eligible_atoms(config, selected, batch_index, fixed)
    if config.corrupt_ratio is not None:
        # Drawn for every atom so the draws do not depend on which atoms are free.
        mask = mask & (torch.rand(batch_index.numel(), generator=noise_gen) < config.corrupt_ratio)
    return mask


def sample_sigmas(
    config: DeNSConfig,
    num_structures: int,
    batch_index: torch.Tensor,
    noise_gen: torch.Generator,
) -> torch.Tensor:
    """Per-atom sigma ``[N, 1]``: ``std``, or one ladder rung per structure."""
    if config.fixed_noise_std:
        return torch.full((batch_index.numel(), 1), float(config.std), dtype=torch.float32)
    ladder = sigma_ladder(config.std_low, config.std_high, config.num_steps)
    rung = torch.randint(0, config.num_steps, (num_structures,), generator=noise_gen)
    return ladder[rung][batch_index].view(-1, 1)


@dataclass
class Corruption:
    """What DeNS did to one batch.

    Attributes:
        selected: ``[B]`` structures chosen for denoising.
        mask: ``[N]`` atoms displaced (and whose forces are encoded).
        sigmas: ``[N, 1]`` sigma of each atom's structure (Å), 0 if not selected.
        noise: ``[N, 3]`` the displacement, zero outside ``mask`` (Å).
        target: ``[N, 3]`` the noise-head target, ``noise / target_std``.
    """

    selected: torch.Tensor
    mask: torch.Tensor
    sigmas: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor

    @property
    def active(self) -> bool:
        """True when at least one atom is corrupted."""
        return bool(self.mask.any())


def sample_corruption(
    config: DeNSConfig,
    batch_index: torch.Tensor,
    fixed: torch.Tensor,
    decision_gen: torch.Generator,
    noise_gen: torch.Generator,
    md: torch.Tensor | None = None,
    num_structures: int | None = None,
    forces: torch.Tensor | None = None,
    stress: torch.Tensor | None = None,
) -> Corruption:
    """Draws the whole corruption of a batch (selection, mask, sigma, noise).

    Args:
        config: the DeNS settings.
        batch_index: ``[N]`` structure index of each atom.
        fixed: ``[N]`` 1 for fixed atoms.
        decision_gen: generator of the structure selection (rank-independent).
        noise_gen: generator of the mask, sigmas and noise (rank-dependent).
        md: optional per-structure MD flag.
        num_structures: structures in the batch (default ``batch_index.max()+1``).
        forces: ``[N, 3]`` labels, for the force skip filters.
        stress: per-structure stress labels, for ``max_stress_norm``.
    """
    batch_index = batch_index.cpu()
    fixed = fixed.cpu()
    if num_structures is None:
        num_structures = int(batch_index.max()) + 1 if batch_index.numel() else 0
    selected = select_structures(config, num_structures, decision_gen, None if md is None else md.cpu())
    selected = selected & structures_allowed(config, batch_index, num_structures, forces, stress)
    mask = corruption_mask(config, selected, batch_index, fixed, noise_gen)
    eligible = eligible_atoms(config, selected, batch_index, fixed)
    too_many = structures_over_ratio(config, mask, eligible, batch_index, num_structures)
    selected, mask = selected & ~too_many, mask & ~too_many[batch_index]
    sigmas = sample_sigmas(config, num_structures, batch_index, noise_gen)
    noise = torch.randn((batch_index.numel(), 3), generator=noise_gen) * sigmas
    noise = noise * mask.view(-1, 1)
    return Corruption(
        selected=selected,
        mask=mask,
        # Structures that are not corrupted look like S2EF ones to a sigma encoder.
        sigmas=sigmas * selected[batch_index].view(-1, 1),
        noise=noise,
        target=noise / config.target_std,
    )
