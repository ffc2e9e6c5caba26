"""How a DeNS batch is made, and what it carries: read in one place by models and trainers.

The trainer corrupts a collated batch in place and marks it with
``denoising_pos_forward = True``; ``noise_mask`` (bool ``[N]``) marks the
displaced atoms when not every atom is, ``noise_vec`` holds the displacement (Å)
and ``denoising_target`` the noise-head target.
"""

from __future__ import annotations

from typing import Any

import torch

from fairchem_dens.core.corruption import TRAINING_STREAMS, sample_corruption, step_generator
from fairchem_dens.core.roles import FORCES, STRESS
from fairchem_dens.core.settings import DeNSConfig

__all__ = [
    "S2EF",
    "FULL",
    "PARTIAL",
    "is_dens_batch",
    "corrupted_atoms",
    "corrupted_structures",
    "batch_kind",
    "apply_corruption",
    "corrupt_batch",
]

S2EF, FULL, PARTIAL = "S2EF", "full-corruption", "partial-corruption"


def is_dens_batch(data: Any) -> bool:
    """True when the trainer corrupted this batch (``data.denoising_pos_forward``)."""
    return bool(getattr(data, "denoising_pos_forward", False))


def corrupted_atoms(data: Any) -> torch.Tensor:
    """Bool ``[N]``: atoms whose output is the noise (all atoms of a DeNS batch without a mask)."""
    num_atoms = data.pos.shape[0]
    if not is_dens_batch(data):
        return torch.zeros(num_atoms, dtype=torch.bool, device=data.pos.device)
    mask = getattr(data, "noise_mask", None)
    if mask is None:
        return torch.ones(num_atoms, dtype=torch.bool, device=data.pos.device)
    return mask.view(-1).bool()


def corrupted_structures(data: Any) -> torch.Tensor:
    """Bool ``[B]``: structures with at least one corrupted atom."""
    counts = torch.zeros(data.natoms.numel(), dtype=torch.long, device=data.natoms.device)
    counts.index_add_(0, data.batch, corrupted_atoms(data).long())
    return counts > 0


def batch_kind(data: Any) -> str:
    """``S2EF``, ``full-corruption`` (every free atom noised) or ``partial-corruption``."""
    if not is_dens_batch(data):
        return S2EF
    corrupted = corrupted_atoms(data)
    free = data.fixed.view(-1) == 0
    return FULL if bool(corrupted[free].all()) else PARTIAL


def apply_corruption(data: Any, corruption) -> bool:
    """Corrupts a batch in place as the trainer does; returns whether it became a DeNS batch.

    Args:
        data: the collated batch.
        corruption: a :class:`fairchem_dens.core.corruption.Corruption` drawn for it.
    """
    if not corruption.active:
        return False
    device = data.pos.device
    data.pos = data.pos + corruption.noise.to(device, data.pos.dtype)
    data.noise_vec = corruption.noise.to(device)
    data.denoising_target = corruption.target.to(device)
    data.sigmas = corruption.sigmas.to(device)
    if not bool(corruption.mask.all()):
        data.noise_mask = corruption.mask.to(device)
    data.denoising_pos_forward = True
    return True


def corrupt_batch(
    config: DeNSConfig,
    data: Any,
    *,
    seed: int,
    step: int,
    rank: int = 0,
    streams: tuple[int, int] = TRAINING_STREAMS,
) -> bool:
    """Draws a batch's corruption and applies it in place: the one way a DeNS batch is made.

    Every draw is determined by ``(seed, step, stream, rank)``; the structure selection of
    ``selection: batch`` uses rank 0's stream on every rank, so all ranks take the same
    branch. Skip filters read the batch's ``forces`` (and ``stress``), relaxation-only its
    ``md`` flags.

    Args:
        config: the DeNS settings.
        data: a collated batch with ``pos``, ``batch``, ``fixed``, ``natoms``, ``forces``.
        seed: the run's seed.
        step: the global training step (the batch index in a validation pass).
        rank: the DDP rank.
        streams: the (decision, noise) stream ids: training or validation.

    Returns:
        True if the batch became a DeNS batch.
    """
    decision_stream, noise_stream = streams
    corruption = sample_corruption(
        config,
        data.batch,
        data.fixed,
        step_generator(seed, step, decision_stream, config.decision_rank(rank)),
        step_generator(seed, step, noise_stream, rank),
        md=getattr(data, "md", None),
        num_structures=data.natoms.numel(),
        forces=getattr(data, FORCES, None),
        stress=getattr(data, STRESS, None),
    )
    return apply_corruption(data, corruption)
