"""The clean structures of a batch as a batch of their own, for fairchem's metrics of excluded outputs."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["structure_subset"]


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
