"""The DeNS loss as functions of tensors: which rows count, what each is trained on, one mean.

An integration computes each output's per-row loss (its framework's loss function on the
normalised prediction and target) and hands it here with the batch's masks. The same
rules then hold in fairchem 1.x and 2.x, in S2EF and in DeNS batches (a batch without a
corrupted atom is an S2EF batch: every mask below is then all-false and the term is the
plain one):

* ``forces`` (role ``replaced``): corrupted atoms are trained on the normalised noise
  with weight lambda_D, the other atoms on their forces with weight lambda_F;
  ``loss_form: hybrid`` takes one mean over all counted atoms (the OC20/OC22 trainer),
  ``separate_means`` one mean over the clean and one over the corrupted atoms (the MD17
  recipe), each empty mean dropped (docs/algorithm.md#loss, #md17-recipe);
* ``original`` outputs (``energy``) are trained on the label of the original structure;
* ``excluded`` outputs (stress, any other property) leave out the rows of corrupted
  structures exactly; clean structures of the same batch are trained as usual.

A ``per_structure`` reduction (fairchem 2's) averages the counted rows of each structure first,
then takes the mean over the structures that have any.

Means are DDP-global: the row count is summed over ranks through an injected
:class:`Reduction`, so this module needs no framework and every rank makes the same
collective calls whatever its batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from fairchem_dens.core.roles import EXCLUDED, REPLACED

__all__ = ["LOCAL", "Reduction", "counted_rows", "global_mean", "output_loss", "per_structure_mean", "structure_rows"]


def _same(values: torch.Tensor) -> torch.Tensor:
    return values


@dataclass(frozen=True)
class Reduction:
    """How a per-rank sum becomes a global one.

    Attributes:
        world_size: number of ranks; a mean is ``sum * world_size / global count`` because
            DDP averages the gradients of the ranks.
        sum_over_ranks: sums a tensor over every rank (the identity on one process).
    """

    world_size: int = 1
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = field(default=_same)


#: One process, no collectives.
LOCAL = Reduction()


def counted_rows(
    fixed: torch.Tensor,
    corrupted: torch.Tensor,
    *,
    level: str,
    num_structures: int,
    on_free: bool = True,
    all_atoms: bool = False,
) -> torch.Tensor:
    """Rows of an output that enter its loss or metric: the single rule for "which atoms count".

    Args:
        fixed: ``[N]`` 1 for fixed atoms.
        corrupted: ``[N]`` bool, corrupted atoms (all false in an S2EF batch).
        level: ``atom`` or ``system``.
        num_structures: structures in the batch.
        on_free: ``train_on_free_atoms`` / ``eval_on_free_atoms`` (default true): only free
            atoms count, plus the corrupted ones when ``all_atoms`` corrupts fixed atoms too.
        all_atoms: the DeNS setting of that name.

    Returns:
        Bool ``[N]`` for atom-level outputs, ``[B]`` (all true) for system-level ones.
    """
    if level != "atom":
        return torch.ones(num_structures, dtype=torch.bool, device=fixed.device)
    if not on_free:
        return torch.ones(fixed.shape[0], dtype=torch.bool, device=fixed.device)
    counted = fixed.view(-1) == 0
    if all_atoms:
        counted = counted | corrupted.view(-1)
    return counted


def structure_rows(corrupted_structures: torch.Tensor, batch_index: torch.Tensor, level: str) -> torch.Tensor:
    """Bool rows of an output that belong to a corrupted structure (``[N]`` atoms or ``[B]`` structures)."""
    return corrupted_structures[batch_index] if level == "atom" else corrupted_structures


def global_mean(
    weighted: torch.Tensor, reduction: Literal["mean", "sum"] = "mean", ranks: Reduction = LOCAL
) -> torch.Tensor:
    """The mean of already weighted rows over every rank (or their local sum).

    A mean over zero rows on every rank is a zero that keeps the autograd graph.
    """
    total = weighted.sum()
    if reduction == "sum":
        return total
    count = int(ranks.sum_over_ranks(torch.tensor(weighted.numel(), device=weighted.device)))
    if count == 0:
        return 0.0 * total
    return total * ranks.world_size / count


def per_structure_mean(
    weighted: torch.Tensor, structure: torch.Tensor, num_structures: int, ranks: Reduction = LOCAL
) -> torch.Tensor:
    """The mean over structures of each structure's mean row, over every rank.

    Args:
        weighted: already weighted rows ``[n, ...]`` (a row's trailing values are summed).
        structure: ``[n]`` the structure of each row.
        num_structures: structures in the batch.
        ranks: how the structure count becomes global.

    Structures without a row are left out of the count; none on every rank gives a zero that keeps
    the autograd graph.
    """
    per_row = weighted.reshape(weighted.shape[0], -1).sum(dim=1)
    structure = structure.to(per_row.device)
    sums = torch.zeros(num_structures, dtype=per_row.dtype, device=per_row.device).index_add(0, structure, per_row)
    counts = torch.bincount(structure, minlength=num_structures)
    present = counts > 0
    total = (sums[present] / counts[present]).sum()
    count = int(ranks.sum_over_ranks(torch.tensor(int(present.sum()), device=per_row.device)))
    if count == 0:
        return 0.0 * weighted.sum()
    return total * ranks.world_size / count


def output_loss(
    elementwise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    role: str,
    coefficient: float,
    rows: torch.Tensor,
    corrupted: torch.Tensor,
    corrupted_rows: torch.Tensor,
    noise_target: torch.Tensor | None = None,
    denoising_coefficient: float = 0.0,
    loss_form: Literal["hybrid", "separate_means"] = "hybrid",
    reduction: Literal["mean", "sum", "per_structure"] = "mean",
    ranks: Reduction = LOCAL,
    structure: torch.Tensor | None = None,
    num_structures: int | None = None,
) -> torch.Tensor:
    """One output's loss term in any batch, by its DeNS role.

    Args:
        elementwise: the per-row loss ``fn(prediction, target) -> [rows, ...]`` (l2mae:
            the norm of the difference per atom; mae, mse: per component).
        prediction: normalised prediction, ``[rows, k]``.
        target: normalised label of the original structure, ``[rows, k]``.
        role: ``original``, ``replaced`` or ``excluded`` (:mod:`fairchem_dens.core.roles`).
        coefficient: the output's loss weight (lambda_F for forces).
        rows: bool, the rows that count (:func:`counted_rows`).
        corrupted: bool ``[N]``, corrupted atoms (used by ``replaced``).
        corrupted_rows: bool, rows of corrupted structures (used by ``excluded``).
        noise_target: ``[N, 3]`` normalised noise (``replaced`` in a DeNS batch).
        denoising_coefficient: lambda_D at this step.
        loss_form: ``hybrid`` or ``separate_means`` (forces only).
        reduction: the loss function's reduction, ``mean``, ``sum`` or ``per_structure`` (a mean
            per structure, then over structures; atom-level outputs only, needs ``structure``).
        ranks: how sums become global (:data:`LOCAL` on one process).
        structure: ``[N]`` the structure of each atom row (``per_structure`` only).
        num_structures: structures in the batch (``per_structure`` only).
    """
    prediction = prediction.float()  # half-precision predictions (AMP) are reduced in float32
    target = target.float()
    device = prediction.device
    weights = torch.full((prediction.shape[0],), float(coefficient), device=device)
    if role == REPLACED:
        corrupted = corrupted.view(-1).to(device)
        if noise_target is not None:
            target = torch.where(corrupted.view(-1, 1), noise_target.to(target), target)
        weights = torch.where(corrupted, torch.tensor(float(denoising_coefficient), device=device), weights)
    elif role == EXCLUDED:
        rows = rows & ~corrupted_rows
    values = elementwise(prediction, target)
    weighted = weights.view(-1, *[1] * (values.dim() - 1)) * values
    if reduction == "per_structure":
        if structure is None or num_structures is None:
            raise ValueError("reduction per_structure needs each row's structure and the number of structures")

        def reduce(mask: torch.Tensor) -> torch.Tensor:
            return per_structure_mean(weighted[mask], structure.to(device)[mask], num_structures, ranks)
    else:

        def reduce(mask: torch.Tensor) -> torch.Tensor:
            return global_mean(weighted[mask], reduction, ranks)

    if role == REPLACED and loss_form == "separate_means":
        # Split in S2EF batches too, so every rank makes the same collectives whatever its batch.
        return reduce(rows & corrupted) + reduce(rows & ~corrupted)
    return reduce(rows)
