"""fairchem 2's ``MLIPTrainEvalUnit`` with DeNS: training batches are corrupted before the forward.

Set it as the runner's unit and give it the DeNS settings under ``dens`` (the keys of
fairchem 1's ``optim`` block, :meth:`fairchem_dens.core.settings.DeNSConfig.from_optim`)::

    runner:
      train_eval_unit:
        _target_: fairchem_dens.fairchem2.unit.DeNSTrainEvalUnit
        dens:
          use_denoising_pos: True
          denoising_pos_coefficient: 10
          denoising_pos_params: {prob: 0.5, fixed_noise_std: True, std: 0.1, corrupt_ratio: 0.5}
        ...  # every argument of fairchem's MLIPTrainEvalUnit

Each training step draws the corruption with :func:`fairchem_dens.core.batch.corrupt_batch`
from ``(job.seed, global step, rank)`` (the batch-level decision from rank 0's stream on
every rank), before the batch reaches the device, the graph is built or positions require
grad; then fairchem's own step runs, with each task's loss following its DeNS role
(:mod:`fairchem_dens.fairchem2.loss`). Validation, prediction and the calculator never see a
corrupted batch. Checkpoints keep the DeNS model for resuming; ``inference_ckpt.pt`` is
plain fairchem (:mod:`fairchem_dens.fairchem2.export`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import torch
from fairchem.core.common import distutils
from fairchem.core.units.mlip_unit.mlip_unit import (
    UNIT_INFERENCE_CHECKPOINT,
    MLIPTrainEvalUnit,
    compute_loss,
    filter_inference_only_tasks,
)
from omegaconf import DictConfig, OmegaConf

from fairchem_dens.core.batch import corrupt_batch
from fairchem_dens.core.corruption import VALIDATION_STREAMS, require_md
from fairchem_dens.core.errors import DeNSConfigError, DeNSSetupError
from fairchem_dens.core.metrics import aggregate, metric_keys
from fairchem_dens.core.roles import FORCES, output_roles
from fairchem_dens.core.settings import DeNSConfig, in_section, located
from fairchem_dens.core.tally import CorruptionTally
from fairchem_dens.fairchem2.datasets import MD_FLAG
from fairchem_dens.fairchem2.export import plain_inference_checkpoint
from fairchem_dens.fairchem2.loss import DeNSStep, DeNSTaskLoss, ranks
from fairchem_dens.fairchem2.models import ENCODED_FORCES, refuse_graph_parallel
from fairchem_dens.files import atomic_write

__all__ = ["DeNSTrainEvalUnit", "original_forces"]

logger = logging.getLogger(__name__)

#: Where the DeNS keys sit in a fairchem-2 config, for the messages.
DENS_SECTION = "runner.train_eval_unit.dens"


def original_forces(data: Any, force_tasks: list[str]) -> torch.Tensor:
    """``[N, 3]`` force labels of every atom from whichever force task labels it (0 where none does)."""
    forces = torch.zeros_like(data.pos)
    for name in force_tasks:
        labels = data[name].view(-1, 3)
        forces = torch.where(torch.isfinite(labels).all(dim=1, keepdim=True), labels.to(forces), forces)
    return forces


class DeNSTrainEvalUnit(MLIPTrainEvalUnit):
    """fairchem's train-eval unit, corrupting training batches with DeNS.

    Args:
        dens: the DeNS settings (``use_denoising_pos``, ``denoising_pos_coefficient``,
            ``denoising_pos_params``), checked before the first step.
        *args, **kwargs: fairchem's ``MLIPTrainEvalUnit`` arguments.
    """

    def __init__(self, *args: Any, dens: Mapping[str, Any], model: torch.nn.Module, tasks: list, **kwargs: Any) -> None:
        if isinstance(dens, DictConfig):
            dens = OmegaConf.to_container(dens, resolve=True)
        config = DeNSConfig.from_optim(dict(dens), section=DENS_SECTION, only_dens_keys=True)
        _check_model(model)
        refuse_graph_parallel()
        trained = filter_inference_only_tasks(tasks)
        try:
            roles = output_roles({task.property: {"level": task.level} for task in trained}, config.output_policy)
        except DeNSConfigError as error:
            raise located(error, DENS_SECTION) from None
        step = DeNSStep(config)
        # The same Task objects serve fairchem's eval unit, where step.batch is always None.
        for task in trained:
            task.loss_fn = DeNSTaskLoss(task, roles[task.property], step)
        if not model.backbone.otf_graph:
            # Edges built from the clean positions (cpu_graph) would miss the corrupted geometry.
            logger.info("DeNS: backbone.otf_graph set to True (edges are built from the noisy positions)")
            model.backbone.otf_graph = True
        super().__init__(*args, model=model, tasks=tasks, **kwargs)
        self.dens, self.roles, self.dens_step = config, roles, step
        self.force_tasks = [task.name for task in trained if task.property == FORCES]
        self.tally = CorruptionTally()
        self._unreported_steps = 0
        self._validation_batches = 0
        self._validation_metrics: dict[str, Any] = {}

    def on_train_start(self, state: Any) -> None:
        if self.dens.enabled and self.dens.relaxation_only:
            # refused before the first step, not at the first batch: one structure tells
            first = state.train_state.dataloader.dataset[0]
            try:
                require_md(self.dens, first[MD_FLAG] if MD_FLAG in first.keys() else None, "the training dataset")
            except DeNSConfigError as error:
                raise located(error, DENS_SECTION) from None
        super().on_train_start(state)

    def _run_fraction(self, state: Any) -> float:
        """Fraction of the run done, for ``coefficient_schedule: linear_decay``."""
        train_state = state.train_state
        if train_state.max_epochs:
            epoch = self.train_progress.num_epochs_completed + (
                self.train_progress.num_steps_completed_in_epoch / max(len(train_state.dataloader), 1)
            )
            return epoch / train_state.max_epochs
        return self.train_progress.num_steps_completed / max(train_state.max_steps or 1, 1)

    def train_step(self, state: Any, data: Any) -> None:
        step = self.train_progress.num_steps_completed
        corrupted = False
        if self.dens.active_in_epoch(self.train_progress.num_epochs_completed):
            forces = original_forces(data, self.force_tasks)
            if FORCES not in data:  # per-dataset force tasks (oc20_forces, ...): the skip filters read `forces`
                data[FORCES] = forces
            corrupted = corrupt_batch(self.dens, data, seed=self.job_config.seed, step=step, rank=distutils.get_rank())
        if corrupted:
            data[ENCODED_FORCES] = forces
            self.dens_step.batch = data  # the same object fairchem moves to the device in place
            self.dens_step.denoising_coefficient = self.dens.coefficient_at(self._run_fraction(state), 1.0)
        try:
            super().train_step(state, data)
        finally:
            self.dens_step.batch = None
        self.tally.add(data)
        self._unreported_steps += 1
        if step % self.print_every == 0 and self.dens_step.metrics:
            logging.info({f"train/{key}": value["metric"] for key, value in self.dens_step.metrics.items()})

    def on_train_epoch_end(self, state: Any) -> None:
        self._report(self.train_progress.num_epochs_completed - 1)

    def on_train_end(self, state: Any) -> None:
        if self._unreported_steps:  # a run that stops at max_steps inside an epoch
            self._report(self.train_progress.num_epochs_completed)
        super().on_train_end(state)

    def _report(self, epoch: int) -> None:
        """The epoch's corruption tally and denoising metrics over every rank (all ranks call it)."""
        line, warning = self.tally.report(epoch, ranks())
        (logging.warning if warning else logging.info)(in_section(line, DENS_SECTION))
        metrics = aggregate(self.dens_step.metrics, metric_keys(self.roles), ranks())
        self.dens_step.metrics.clear()
        self._unreported_steps = 0
        log = {f"train/{key}": value["metric"] for key, value in metrics.items()}
        logging.info({"dens_epoch": epoch + 1, **log})
        if self.logger is not None and log:
            self.logger.log(log, step=self.train_progress.num_steps_completed, commit=False)

    # ------------------------------------------------------------ validate_denoising
    def on_eval_epoch_start(self, state: Any) -> None:
        super().on_eval_epoch_start(state)
        self._validation_batches = 0
        self._validation_metrics = {}

    def eval_step(self, state: Any, data: Any) -> None:
        if self.dens.enabled and self.dens.validate_denoising:
            # a corrupted copy: fairchem's own evaluation below sees the clean batch
            self._validate_denoising(data.clone(), self._validation_batches)
        self._validation_batches += 1
        super().eval_step(state, data)

    def _validate_denoising(self, data: Any, index: int) -> None:
        """Denoising metrics of one validation batch, every structure corrupted from ``validation_seed``,
        as the fairchem-1 trainer reports them: the same batches give the same corruption in every run."""
        always = dataclasses.replace(self.dens, prob=1.0, selection="structure")
        forces = original_forces(data, self.force_tasks)
        if FORCES not in data:
            data[FORCES] = forces
        if not corrupt_batch(
            always,
            data,
            seed=self.dens.validation_seed,
            step=index,
            rank=distutils.get_rank(),
            streams=VALIDATION_STREAMS,
        ):
            return  # skip filters left every structure clean
        data[ENCODED_FORCES] = forces
        data = data.to(distutils.get_device_for_local_rank())
        train_metrics, self.dens_step.metrics = self.dens_step.metrics, self._validation_metrics
        self.dens_step.batch, self.dens_step.denoising_coefficient = data, self.dens.coefficient
        try:
            with torch.autocast(
                device_type=distutils.get_device_for_local_rank(),
                enabled=self.eval_unit.autocast_enabled,
                dtype=self.eval_unit.autocast_dtype,
            ):
                predictions = self.eval_unit.model(data)
            compute_loss(self.tasks, predictions, data)  # the task losses record the denoising metrics
        finally:
            self.dens_step.batch, self.dens_step.metrics = None, train_metrics

    def on_eval_epoch_end(self, state: Any) -> None:
        super().on_eval_epoch_end(state)
        if self.dens.enabled and self.dens.validate_denoising:
            metrics = aggregate(self._validation_metrics, metric_keys(self.roles), ranks())
            log = {f"val/{key}": value["metric"] for key, value in metrics.items()}
            logging.info(log)
            if self.logger is not None and log:
                self.logger.log(log, step=self.train_progress.num_steps_completed, commit=False)

    def save_state(self, checkpoint_location: str) -> None:
        super().save_state(checkpoint_location)
        path = os.path.join(checkpoint_location, UNIT_INFERENCE_CHECKPOINT)
        if distutils.is_master() and os.path.exists(path):
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            # a job killed while rewriting keeps fairchem's file (the project's one atomic writer)
            with atomic_write(path) as temp:
                torch.save(plain_inference_checkpoint(checkpoint), temp)
            logging.info(
                f"{path}: plain fairchem, loadable without fairchem_dens. On a CPU load it with "
                "load_predict_unit(path, inference_settings='batch'): fairchem's default settings compile the "
                "model, and torch 2.13's compiled CPU code aborts or computes wrong numbers "
                "(docs/fairchem2.md#predicting-with-fairchems-calculator)"
            )


def _check_model(model: torch.nn.Module) -> None:
    """Refuses a model that cannot train DeNS (no force encoding or no DeNS force head)."""
    backbone = getattr(model, "backbone", None)
    heads = getattr(model, "output_heads", {})
    if backbone is None or not hasattr(backbone, "force_embedding"):
        raise DeNSSetupError(
            "DeNS needs a backbone with the force encoding: set backbone.model to "
            "fairchem_dens.fairchem2.models.DeNSeSCNMDBackbone (or DeNSeSCNMDMoeBackbone for UMA)."
        )
    if not any(getattr(head, "dens_force_head", False) for head in heads.values()):
        raise DeNSSetupError(
            "DeNS needs a force head that predicts the noise: set the forces head's module to "
            "fairchem_dens.fairchem2.models.DeNSLinearForceHead."
        )
