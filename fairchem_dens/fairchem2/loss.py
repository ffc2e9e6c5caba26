"""fairchem 2's task losses with the DeNS roles of :mod:`fairchem_dens.core.roles`.

fairchem's ``compute_loss`` calls each ``Task.loss_fn(prediction, target, mult_mask=,
natoms=)`` with the normalised prediction and target. :class:`DeNSTaskLoss` takes that
place for every task and, in a DeNS batch of a training step, applies the task's role:

* ``replaced`` (``forces``): the whole term is :func:`fairchem_dens.core.loss.output_loss`
  (noise on corrupted atoms with weight lambda_D, forces elsewhere with lambda_F);
* ``excluded`` (stress, any other property): fairchem's loss with the rows of corrupted
  structures taken out of its mask, so they leave its sum and its count;
* ``original`` (energy): fairchem's loss unchanged (the label is the original structure's).

In every other call (batches without corruption, validation) it is fairchem's loss
untouched. The batch of the current step comes from a shared :class:`DeNSStep`, which the
unit fills before the forward and empties after the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from fairchem.core.common import distutils
from torch import nn

from fairchem_dens.core.batch import corrupted_atoms, corrupted_structures
from fairchem_dens.core.errors import DeNSSetupError, NonFiniteLossError
from fairchem_dens.core.loss import Reduction, counted_rows, output_loss, structure_rows
from fairchem_dens.core.metrics import accumulate, denoising_errors, original_mae
from fairchem_dens.core.roles import EXCLUDED, ORIGINAL, REPLACED
from fairchem_dens.core.settings import DeNSConfig

__all__ = ["DeNSStep", "DeNSTaskLoss", "ranks"]


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    # NCCL reduces CUDA tensors only: the epoch's metric and tally counts live on the CPU.
    device = distutils.get_device_for_local_rank()
    return distutils.all_reduce(tensor.to(device), device=device).to(tensor.device)


def ranks() -> Reduction:
    """fairchem's DDP world as the core's :class:`~fairchem_dens.core.loss.Reduction`."""
    return Reduction(distutils.get_world_size(), _sum_over_ranks)


@dataclass
class DeNSStep:
    """What the losses of one training step need to know; ``batch`` is None outside DeNS batches.

    Attributes:
        config: the DeNS settings.
        batch: the corrupted batch of the current step, or None.
        denoising_coefficient: lambda_D at this step.
        metrics: running denoising metrics of the epoch (:mod:`fairchem_dens.core.metrics`).
    """

    config: DeNSConfig
    batch: Any = None
    denoising_coefficient: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


class DeNSTaskLoss(nn.Module):
    """A task's fairchem loss (a ``DDPMTLoss``) that follows the task's DeNS role in DeNS batches.

    Args:
        task: the fairchem ``Task`` (its ``loss_fn`` is the wrapped loss).
        role: the task property's DeNS role.
        step: the unit's :class:`DeNSStep`, shared by every task.
    """

    def __init__(self, task: Any, role: str, step: DeNSStep) -> None:
        super().__init__()
        self.fairchem_loss = task.loss_fn
        self.role = role
        self.dens_step = step
        self.task_name, self.level, self.property_name = task.name, task.level, task.property
        self.train_on_free_atoms = task.train_on_free_atoms
        self.normalizer = task.normalizer
        if role == REPLACED and self.fairchem_loss.reduction not in ("mean", "sum", "per_structure"):
            raise DeNSSetupError(
                f"task {task.name}: DeNS reduces the forces-and-noise loss by mean, sum or per_structure, "
                f"got reduction {self.fairchem_loss.reduction!r}"
            )

    @property
    def reduction(self) -> str:
        return self.fairchem_loss.reduction

    def forward(
        self, prediction: torch.Tensor, target: torch.Tensor, mult_mask: torch.Tensor, natoms: torch.Tensor
    ) -> torch.Tensor:
        data = self.dens_step.batch
        if data is None or self.role == ORIGINAL:
            if data is not None:
                self._original_metric(data, prediction, target, mult_mask)
            return self.fairchem_loss(prediction, target, mult_mask=mult_mask, natoms=natoms)
        if self.role == EXCLUDED:
            kept = ~structure_rows(corrupted_structures(data), data.batch, self.level)
            kept = kept.view(-1, *[1] * (mult_mask.dim() - 1))
            return self.fairchem_loss(prediction, target, mult_mask=mult_mask & kept, natoms=natoms)
        return self._dens_forces(data, prediction, target, natoms)

    def _dens_forces(
        self, data: Any, prediction: torch.Tensor, target: torch.Tensor, natoms: torch.Tensor
    ) -> torch.Tensor:
        config = self.dens_step.config
        corrupted = corrupted_atoms(data)
        # Atoms whose structure has this task's label (others are +inf in the target).
        labelled = torch.isfinite(target).all(dim=-1)
        rows = (
            counted_rows(
                data.fixed,
                corrupted,
                level="atom",
                num_structures=natoms.numel(),
                on_free=self.train_on_free_atoms,
                all_atoms=config.all_atoms,
            )
            & labelled
        )
        target = torch.nan_to_num(target, posinf=0.0, neginf=0.0)
        loss = output_loss(
            lambda p, t: self.fairchem_loss.loss_fn(p, t, natoms),
            prediction,
            target,
            role=REPLACED,
            coefficient=self.fairchem_loss.coefficient,
            rows=rows,
            corrupted=corrupted,
            corrupted_rows=structure_rows(corrupted_structures(data), data.batch, "atom"),
            noise_target=data.denoising_target,
            denoising_coefficient=self.dens_step.denoising_coefficient,
            loss_form=config.loss_form,
            reduction=self.reduction,
            ranks=ranks(),
            structure=data.batch,
            num_structures=natoms.numel(),
        )
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(
                f"the DeNS loss of task {self.task_name} is {float(loss)}: check the force labels and "
                "denoising_pos_params (std, std_low/std_high) for NaN or huge values."
            )
        with torch.no_grad():
            errors = denoising_errors(
                prediction.detach().float(),
                data.noise_vec,
                config.target_std,
                corrupted,
                rows,
                forces_prediction=self.normalizer.denorm(prediction.detach().float()),
                forces=self.normalizer.denorm(target.float()),
            )
            for key, values in errors.items():
                accumulate(self.dens_step.metrics, key, values)
        return loss

    @torch.no_grad()
    def _original_metric(
        self, data: Any, prediction: torch.Tensor, target: torch.Tensor, mult_mask: torch.Tensor
    ) -> None:
        """``denoising_<property>_mae`` over the structures of a DeNS batch this task labels (physical units),
        as the fairchem-1 trainer reports it."""
        if self.level != "system":
            return
        rows = mult_mask.view(mult_mask.shape[0], -1).all(dim=1)
        prediction = self.normalizer.denorm(prediction.float()).view(rows.shape[0], -1)
        target = self.normalizer.denorm(target.float()).view(rows.shape[0], -1)
        accumulate(self.dens_step.metrics, original_mae(self.property_name), (prediction - target).abs()[rows])
