"""What a DeNS batch carries, read in one place by the models and the trainer.

The trainer corrupts a collated batch in place and marks it with
``denoising_pos_forward = True``; ``noise_mask`` (bool ``[N]``) marks the
displaced atoms when not every atom is, ``noise_vec`` holds the displacement (Å)
and ``denoising_target`` the noise-head target.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "S2EF",
    "FULL",
    "PARTIAL",
    "is_dens_batch",
    "corrupted_atoms",
    "corrupted_structures",
    "batch_kind",
    "structure_subset",
    "apply_corruption",
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


def structure_subset(data: Any, keep: torch.Tensor, fields: dict[str, str]):
    """The structures ``keep`` of a batch, with the fields fairchem's metrics read.

    Args:
        data: the batch.
        keep: bool ``[B]``, the structures to keep.
        fields: target fields to carry, ``{name: level}`` (``atom`` or ``system``).

    Returns:
        ``(subset, atoms)``: a PyG ``Data`` with ``natoms``, ``fixed``,
        ``atomic_numbers``, ``batch`` (renumbered) and ``fields``, and the bool
        ``[N]`` mask of the kept atoms.
    """
    from torch_geometric.data import Data

    atoms = keep[data.batch]
    renumber = torch.cumsum(keep.long(), 0) - 1
    subset = Data(
        natoms=data.natoms[keep],
        fixed=data.fixed[atoms],
        atomic_numbers=data.atomic_numbers[atoms],
        batch=renumber[data.batch[atoms]],
    )
    for name, level in fields.items():
        rows = atoms if level == "atom" else keep  # collated tensors may be stacked, e.g. stress [3B, 3]
        subset[name] = data[name].reshape(rows.shape[0], -1)[rows]
    return subset, atoms


def apply_corruption(data: Any, corruption) -> bool:
    """Corrupts a batch in place as the trainer does; returns whether it became a DeNS batch.

    Args:
        data: the collated batch.
        corruption: a :class:`fairchem_dens.noise.Corruption` drawn for it.
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
