"""The DeNS trainer: fairchem's EquiformerV2 forces trainer plus denoising.

The DeNS rules are the core's (:mod:`fairchem_dens.core`: the corruption, the loss and the
metrics as functions of tensors); this class maps fairchem 1.10's batches, targets,
normalisers and collectives onto them. What changes against fairchem's trainer:

* ``_forward`` corrupts the batch (:func:`fairchem_dens.core.batch.corrupt_batch`) when the model is in training mode (the only
  place fairchem calls it in training mode is ``train()``), so validation,
  prediction and relaxations never see noise;
* ``_compute_loss`` trains each output by its DeNS role (original / replaced /
  excluded, :mod:`fairchem_dens.core.roles`), with the denoising
  term of the original implementation (docs/algorithm.md#loss), and stops on a non-finite
  prediction, target or term, naming it;
* ``_compute_metrics`` reports ``denoising_*`` metrics for DeNS batches;
* ``validate`` optionally adds denoising metrics under a fixed seed;
* the ``load_*`` steps refuse, before step 1 and before fairchem's normaliser files
  are written, what would fail later or train something else than asked
  (:mod:`fairchem_dens.trainers.guards`), including non-finite labels the normaliser
  fit reads (:mod:`fairchem_dens.trainers.labels`);
* every training batch is checked for non-finite labels before it is corrupted, and
  each epoch logs the fraction of structures and atoms it corrupted;
* checkpoints are written atomically, a final ``checkpoint.pt`` is always
  written when training ends, and ``optim.keep_checkpoint_epochs`` keeps copies at
  chosen epochs (:mod:`fairchem_dens.trainers.kept_checkpoints`).

Everything else (data loading, DDP, EMA, AMP, clipping, schedulers, prediction
files) is fairchem's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from typing import Any

import numpy as np
import torch
from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import save_checkpoint
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import (
    EquiformerV2ForcesTrainer,
)
from fairchem.core.modules.evaluator import Evaluator
from fairchem.core.modules.normalization.normalizer import Normalizer

from fairchem_dens.core import loss as dens_loss
from fairchem_dens.core import metrics as dens_metrics
from fairchem_dens.core.batch import (
    S2EF,
    batch_kind,
    corrupt_batch,
    corrupted_atoms,
    corrupted_structures,
    is_dens_batch,
)
from fairchem_dens.core.corruption import TRAINING_STREAMS, VALIDATION_STREAMS
from fairchem_dens.core.errors import NonFiniteLossError
from fairchem_dens.core.roles import EXCLUDED, FORCES, ORIGINAL, STRESS, output_roles
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.core.tally import CorruptionTally
from fairchem_dens.files import replace_durably
from fairchem_dens.models.checkpoints import (
    CheckpointMismatchError,
    checkpoint_family,
    explain_mismatch,
    normalize_fork_keys,
    read_checkpoint,
    strip_ddp_prefix,
)
from fairchem_dens.models.convert_original import convert_original_checkpoint
from fairchem_dens.trainers.guards import (
    DeNSSetupError,
    check_denoising_splits,
    check_gradient_normalizers,
    check_loss_functions,
    check_model,
    check_normalizers,
    check_skip_filters,
    check_training_sample,
    check_warmup,
)
from fairchem_dens.trainers.kept_checkpoints import kept_epochs, kept_name
from fairchem_dens.trainers.labels import FitRecorder, check_batch_labels
from fairchem_dens.trainers.normalizer_ties import apply_rmsd_ties, pop_rmsd_ties
from fairchem_dens.trainers.schedule_length import schedule_epochs
from fairchem_dens.trainers.structure_subset import structure_subset

__all__ = ["DeNSTrainer", "NonFiniteLossError", "DeNSSetupError"]

NOISE_TARGET = "denoising_pos_target"


@registry.register_trainer("fairchem_dens_trainer")
class DeNSTrainer(EquiformerV2ForcesTrainer):
    """EquiformerV2/eSCN S2EF training with DeNS as an auxiliary task.

    Takes fairchem's trainer arguments unchanged; the DeNS settings come from
    ``optim`` (see :class:`fairchem_dens.core.settings.DeNSConfig`) and are validated
    before anything is built.

    The task name is ``s2ef`` (fairchem would call a trainer given by dotted
    path ``ocp``), so predictions land in ``s2ef_predictions.npz`` as the
    leaderboard tooling expects, and checkpoints record the plain ``forces``
    trainer, which is all inference needs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer", args[4] if len(args) > 4 else None)
        if optimizer is None:
            raise ValueError("the DeNS trainer needs the `optim` section of the config")
        self.dens = DeNSConfig.from_optim(optimizer)
        self._schedule_epochs = schedule_epochs(optimizer)  # refused here, before anything is written
        self._tally = CorruptionTally()  # this epoch's corrupted structures and atoms
        if kwargs.get("name", "ocp") == "ocp":
            kwargs["name"] = "s2ef"
        super().__init__(*args, **kwargs)
        # Inference needs no DeNS logic; a registered plain trainer name lets
        # fairchem's ASE calculator rebuild a trainer from our checkpoints.
        self.config["trainer"] = "forces"

    # ------------------------------------------------------------------ setup
    def load_task(self) -> None:
        super().load_task()
        # What a DeNS batch does with each output; refuses configs DeNS cannot train.
        self.output_roles = output_roles(self.output_targets, self.dens.output_policy) if self.dens.enabled else {}
        check_loss_functions(self.config.get("loss_functions", []))

    def load_model(self) -> None:
        super().load_model()
        if self.dens.enabled:
            check_model(self._unwrapped_model, FORCES)

    def load_datasets(self) -> None:
        super().load_datasets()
        if self.train_dataset is not None and len(self.train_dataset) > 0:
            check_training_sample(self.dens, self.train_dataset[0], self._trained(), self.config["dataset"].get("src"))
        optim = self.config["optim"]
        if self.train_loader is not None and optim.get("scheduler") == "LambdaLR":
            check_warmup(optim.get("scheduler_params", {}), len(self.train_loader))
        self._kept_epochs = kept_epochs(optim, len(self.train_loader)) if self.train_loader is not None else frozenset()
        evaluated = {
            split: (getattr(self, f"{split}_dataset", None), self.config.get(f"{split}_dataset", {}).get("src"))
            for split in ("val", "test")
        }
        check_denoising_splits(
            self.dens,
            {
                split: (dataset[0], source)
                for split, (dataset, source) in evaluated.items()
                if dataset is not None and len(dataset) > 0
            },
        )

    def load_extras(self) -> None:
        # fairchem sizes its LR schedule by optim.max_epochs: give it the schedule's length
        optim = self.config["optim"]
        max_epochs = optim["max_epochs"]
        optim["max_epochs"] = self._schedule_epochs
        try:
            super().load_extras()
        finally:
            optim["max_epochs"] = max_epochs

    def _trained(self) -> list[str]:
        """The outputs ``loss_functions`` trains."""
        return [next(iter(entry)) for entry in self.config.get("loss_functions", [])]

    def load_references_and_normalizers(self) -> None:
        transforms = self.config["dataset"].get("transforms", {})
        norm_config = transforms.get("normalizer")
        ties = pop_rmsd_ties(norm_config)
        source = self.config["dataset"].get("src")
        train_dataset, is_debug = self.train_dataset, self.is_debug
        recorder = None if train_dataset is None else FitRecorder(train_dataset, self.label_names(), self.dens, source)
        # fairchem's fit reads the labels through the recorder; fairchem would also write
        # normalizers.pt before the checks below: the files are written once they pass.
        self.train_dataset, self.is_debug = recorder or train_dataset, True
        try:
            super().load_references_and_normalizers()
        finally:
            self.train_dataset, self.is_debug = train_dataset, is_debug
        apply_rmsd_ties(self.normalizers, ties, norm_config)
        self._check_fit_labels(recorder, source)
        # fairchem builds the model before it fits the normalizers
        check_gradient_normalizers(self._unwrapped_model, self.normalizers, self.output_targets)
        fitted = {k: v for k, v in self.normalizers.items() if k != NOISE_TARGET}
        check_normalizers(fitted, self._normalizer_samples())
        if distutils.is_master() and not self.is_debug:
            # fairchem's files, on the CPU as fairchem writes them (it reads them back without map_location)
            folder = self.config["cmd"]["checkpoint_dir"]
            for config, modules, name in (
                (transforms.get("element_references"), self.elementrefs, "element_references"),
                (norm_config, fitted, "normalizers"),
            ):
                if config is not None:
                    save_checkpoint({k: copy.deepcopy(v).cpu() for k, v in modules.items()}, folder, f"{name}.pt")
        self._set_noise_normalizer()

    def label_names(self) -> list[str]:
        """Labels checked for NaN/inf: the forces DeNS encodes, every trained target, a filtered stress."""
        stress = [STRESS] if self.dens.max_stress_norm is not None else []
        return list(dict.fromkeys([FORCES, *self._trained(), *stress]))

    def _check_fit_labels(self, recorder: FitRecorder | None, source: str) -> None:
        """Refuses the labels the normaliser fit read (rank 0 read them; every rank raises)."""
        problem = [None]
        if distutils.is_master() and recorder is not None:
            problem[0] = recorder.non_finite_message()
            if problem[0] is None and self.dens.enabled and recorder.complete:
                try:
                    check_skip_filters(self.dens, recorder.filter_values, source)
                except DeNSSetupError as error:
                    problem[0] = str(error)
        distutils.broadcast_object_list(problem, src=0, device=self.device)
        if problem[0] is not None:
            raise DeNSSetupError(problem[0])

    def _set_noise_normalizer(self) -> None:
        # Saved with the checkpoint under the name both published implementations use.
        self.normalizers[NOISE_TARGET] = Normalizer(mean=0.0, rmsd=self.dens.target_std).to(self.device)

    def _normalizer_samples(self) -> str:
        """How many training samples a normaliser fit saw, for error messages."""
        config = self.config["dataset"].get("transforms", {}).get("normalizer", {})
        size = len(self.train_dataset) if self.train_dataset is not None else 0
        if "fit" not in config:
            return f"given by the config or a file; the training set has {size} sample(s)"
        fit = config["fit"]
        num_batches = fit.get("num_batches")
        seen = size if num_batches is None else min(size, num_batches * fit.get("batch_size", size))
        return f"fitted on {seen} training sample(s)"

    # ------------------------------------------------------------- checkpoints
    def load_checkpoint(
        self, checkpoint_path: str, checkpoint: dict | None = None, inference_only: bool = False
    ) -> None:
        """fairchem's loader, plus original-DeNS checkpoints and readable mismatch errors.

        The file is read with ``weights_only=True``. A checkpoint of the original
        implementation is converted on the fly (see
        :func:`fairchem_dens.models.convert_original.convert_original_checkpoint`).
        """
        if checkpoint is None:
            logging.info(f"Loading checkpoint from: {checkpoint_path}")
            checkpoint = read_checkpoint(checkpoint_path)
        layout, _family = checkpoint_family(checkpoint)
        if layout == "original":
            logging.info("%s is an original DeNS checkpoint: converting it", checkpoint_path)
            checkpoint = convert_original_checkpoint(checkpoint)
        model_state = self._unwrapped_model.state_dict()
        state = strip_ddp_prefix(checkpoint["state_dict"])
        if any(k.startswith("output_heads.forces.vector_block.") for k in model_state):
            state = normalize_fork_keys(state)
        if self.config.get("task", {}).get("strict_load", True):
            problems = explain_mismatch(model_state, state)
            if problems:
                raise CheckpointMismatchError(f"{checkpoint_path} does not fit the model of this config:\n{problems}")
        super().load_checkpoint(
            checkpoint_path, checkpoint={**checkpoint, "state_dict": state}, inference_only=inference_only
        )
        self._use_configured_noise_scale(checkpoint_path)

    def _use_configured_noise_scale(self, source: str) -> None:
        """sigma_N comes from the config alone: target, saved normaliser and metrics agree."""
        if not self.dens.enabled:
            return
        saved = self.normalizers.get(NOISE_TARGET)
        if saved is not None and abs(float(saved.rmsd) - self.dens.target_std) > 1e-7 * self.dens.target_std:
            logging.warning(
                f"{source} was trained with a noise scale sigma_N = {float(saved.rmsd):g} Å "
                f"(normalizer `{NOISE_TARGET}`) but this config sets {self.dens.target_std:g} Å "
                "(std, or std_high for multi-scale noise): the config's value is used for "
                "the noise target, the saved normalizer and the denoising metrics."
            )
        self._set_noise_normalizer()

    def save(self, metrics=None, checkpoint_file: str = "checkpoint.pt", training_state: bool = True):
        """fairchem's save, made atomic: a temporary file in the same folder, then a rename.

        A job killed while saving (time limit, OOM kill) leaves the previous file intact.
        """
        partial = f".{checkpoint_file}.partial"
        path = super().save(metrics=metrics, checkpoint_file=partial, training_state=training_state)
        if path is None:
            return None
        final = os.path.join(os.path.dirname(path), checkpoint_file)
        replace_durably(path, final)
        if training_state and checkpoint_file == "checkpoint.pt":
            self._saved_step = self.step
            epoch, within = divmod(self.step, len(self.train_loader))
            if within == 0 and epoch in getattr(self, "_kept_epochs", ()):
                kept = os.path.join(os.path.dirname(final), kept_name(epoch))
                shutil.copyfile(final, kept + ".partial")
                replace_durably(kept + ".partial", kept)
        return final

    def train(self, disable_eval_tqdm: bool = False) -> None:
        """fairchem's training loop, plus a final ``checkpoint.pt`` that is always written."""
        optim = self.config["optim"]
        total = optim["max_epochs"] * len(self.train_loader)
        every = optim.get("checkpoint_every", optim.get("eval_every", len(self.train_loader)))
        if every != -1 and every > total - self.step:
            logging.info(
                f"optim.checkpoint_every ({every}) is longer than the {total - self.step} steps left: "
                "no intermediate checkpoint will be written; checkpoint.pt is saved when training ends."
            )
        super().train(disable_eval_tqdm=disable_eval_tqdm)
        if getattr(self, "_saved_step", None) != self.step:
            self.save(checkpoint_file="checkpoint.pt", training_state=True)

    # -------------------------------------------------------------- corruption
    def _forward(self, batch):
        if self.model.training:
            check_batch_labels(batch, self.label_names(), self.step, self.epoch)
            epoch = self._epoch_index()
            if self.dens.active_in_epoch(epoch):
                self.corrupt(batch, step=self.step, rank=distutils.get_rank())
                self._count_corruption(batch, epoch)
        return super()._forward(batch)

    def _ranks(self, device=None) -> dens_loss.Reduction:
        """fairchem's collectives for the core's DDP-global sums."""
        device = self.device if device is None else device
        return dens_loss.Reduction(
            distutils.get_world_size(), lambda values: distutils.all_reduce(values, device=device)
        )

    def _count_corruption(self, batch, epoch: int) -> None:
        """Adds a training batch to its epoch's counts; logs them after the epoch's last batch."""
        self._tally.add(batch)
        if self.step % len(self.train_loader) != 0:
            return
        line, nothing = self._tally.report(epoch, self._ranks())  # every rank reaches the epoch's end together
        if distutils.is_master():
            (logging.warning if nothing else logging.info)(line)

    def _epoch_index(self) -> int:
        """The 0-based epoch of the current step (fairchem's ``epoch`` is fractional, in (k, k+1])."""
        steps = len(self.train_loader) if self.train_loader is not None else 0
        return max(self.step - 1, 0) // steps if steps else 0

    def corrupt(
        self,
        batch,
        step: int,
        rank: int = 0,
        streams: tuple[int, int] = TRAINING_STREAMS,
        seed: int | None = None,
        dens: DeNSConfig | None = None,
    ) -> bool:
        """Corrupts ``batch`` in place (CPU, before it is moved to the device).

        Args:
            batch: the collated batch.
            step: the global step; with ``seed`` it determines every draw.
            rank: DDP rank (mask, noise and per-structure selections differ per
                rank, the batch-level decision does not).
            streams: the (decision, noise) stream ids (validation uses its own pair).
            seed: seed override (default: the run's ``--seed``).
            dens: settings override (default: the run's).

        Returns:
            True if the batch became a DeNS batch.
        """
        seed = (self.config["cmd"].get("seed") or 0) if seed is None else seed
        return corrupt_batch(
            self.dens if dens is None else dens, batch, seed=seed, step=step, rank=rank, streams=streams
        )

    # -------------------------------------------------------------------- loss
    def _compute_loss(self, out, batch) -> torch.Tensor:
        """Every term by one rule: fairchem's per-element loss, weighted, DDP-global mean.

        Each output follows its DeNS role (:mod:`fairchem_dens.core.roles`).
        In an S2EF batch this is fairchem's loss. In a DeNS batch ``forces`` is trained
        on the normalised noise on corrupted atoms (weight lambda_D) and on the forces
        elsewhere (weight lambda_F) in one mean (``loss_form: hybrid``) or two
        (``separate_means``, the MD17 recipe), and excluded outputs leave out corrupted
        structures. With ``l2mae`` forces this is docs/algorithm.md#loss (hybrid) and
        docs/algorithm.md#md17-recipe (separate means) exactly; another force ``fn``
        (``mae``, ``mse``) is applied the same way per atom, so the loss keeps its form
        between full, partial and S2EF batches.
        """
        kind = batch_kind(batch)
        self._check_finite(out, batch, kind)
        terms = {}
        for target_name, loss_info in self.loss_functions:
            name = "denoising" if target_name == FORCES and kind != S2EF else target_name
            terms[name] = self._loss_term(target_name, out[target_name], batch, loss_info)
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(
                    f"the {name} loss is {value.item()} in a {kind} batch at step {self.step} (epoch "
                    f"{self.epoch:.3f}); stopping before the weights are updated. "
                    "Lower the learning rate, check the data, or resume from the last checkpoint."
                )
        return sum(terms.values())

    def _check_finite(self, out, batch, kind: str) -> None:
        # fairchem's DDPLoss replaces NaN predictions by 0, which would hide a broken step.
        checked = [
            (name, what, values)
            for name, _ in self.loss_functions
            for what, values in (("prediction", out[name]), ("target", batch[name]))
        ]
        finite = torch.stack([torch.isfinite(values).all() for _, _, values in checked]).tolist()  # one sync
        for (name, what, values), ok in zip(checked, finite):
            if not ok:
                raise NonFiniteLossError(
                    f"the `{name}` {what} has {int((~torch.isfinite(values)).sum())} NaN/inf value(s) in a {kind} "
                    f"batch at step {self.step} (epoch {self.epoch:.3f}); stopping before the "
                    "weights are updated. Lower the learning rate, check the data, or resume "
                    "from the last checkpoint."
                )

    def _loss_term(self, name: str, pred: torch.Tensor, batch, loss_info: dict[str, Any]) -> torch.Tensor:
        """One output's loss term in any batch: fairchem's per-row loss, the core's DeNS rules."""
        fn = loss_info["fn"]
        dens = is_dens_batch(batch)
        return dens_loss.output_loss(
            lambda prediction, target: fn.loss_fn(prediction, target, natoms=batch.natoms),
            pred,
            self._normalized_target(name, batch),
            role=self.output_roles.get(name, ORIGINAL),  # in S2EF batches every mask is all-false
            coefficient=float(loss_info["coefficient"]),
            rows=self._counted(name, batch, training=True),
            corrupted=corrupted_atoms(batch),
            corrupted_rows=dens_loss.structure_rows(
                corrupted_structures(batch), batch.batch, self.output_targets[name]["level"]
            ),
            noise_target=batch.denoising_target if dens else None,
            denoising_coefficient=self.dens.coefficient_at(self.epoch, self._schedule_epochs),
            loss_form=self.dens.loss_form if name == FORCES else "hybrid",
            reduction=fn.reduction,
            ranks=self._ranks(pred.device),
        )

    def _normalized_target(self, name: str, batch) -> torch.Tensor:
        """fairchem's target of ``name``: reshaped, element references removed, normalised."""
        rows = batch.natoms.sum() if self.output_targets[name]["level"] == "atom" else batch.natoms.numel()
        target = batch[name].view(int(rows), -1).float()
        if name in self.elementrefs:
            target = self.elementrefs[name].dereference(target, batch)
        if name in self.normalizers:
            target = self.normalizers[name].norm(target)
        return target

    def _counted(self, name: str, batch, training: bool) -> torch.Tensor:
        """Rows of ``name`` that enter the loss (``training``) or the metrics (:func:`~fairchem_dens.core.loss.counted_rows`)."""
        target = self.output_targets[name]
        return dens_loss.counted_rows(
            batch.fixed,
            corrupted_atoms(batch),
            level=target["level"],
            num_structures=batch.natoms.numel(),
            on_free=target.get("train_on_free_atoms" if training else "eval_on_free_atoms", True),
            all_atoms=self.dens.all_atoms,
        )

    # ----------------------------------------------------------------- metrics
    def _compute_metrics(self, out, batch, evaluator, metrics=None):
        if not is_dens_batch(batch):
            return super()._compute_metrics(out, batch, evaluator, metrics)
        metrics = self.denoising_metrics(out, batch, evaluator, metrics)
        return self._excluded_metrics(out, batch, evaluator, metrics)

    def denoising_metrics(self, out, batch, evaluator=None, metrics=None) -> dict[str, Any]:
        """Metrics of a DeNS batch in physical units (:mod:`fairchem_dens.core.metrics`).

        Each over the atoms that count for evaluation (:meth:`_counted`); ``evaluator`` is
        not used (kept for fairchem's ``_compute_metrics`` signature).
        """
        metrics = {} if metrics is None else metrics
        with torch.no_grad():
            for name in self.output_targets:
                if self.output_roles[name] != ORIGINAL:
                    continue
                pred = self._denorm_preds(name, out[name].detach().float(), batch)
                rows = self._counted(name, batch, training=False)
                error = (pred - batch[name].view(pred.shape[0], -1).to(pred)).abs()[rows]
                dens_metrics.accumulate(metrics, dens_metrics.original_mae(name), error)
            pred = out[FORCES].detach().float()
            errors = dens_metrics.denoising_errors(
                pred,
                batch.noise_vec,
                self.dens.target_std,
                corrupted_atoms(batch),
                self._counted(FORCES, batch, training=False),
                forces_prediction=self._denorm_preds(FORCES, pred, batch),
                forces=batch.forces,
            )
            for key, error in errors.items():
                dens_metrics.accumulate(metrics, key, error)
        return metrics

    def _excluded_metrics(self, out, batch, evaluator, metrics) -> dict[str, Any]:
        """fairchem's metrics of excluded outputs, on the clean structures of a DeNS batch."""
        excluded = {
            name: evaluator.target_metrics[name]
            for name, role in self.output_roles.items()
            if role == EXCLUDED and name in evaluator.target_metrics
        }
        clean = ~corrupted_structures(batch)
        if not excluded or not bool(clean.any()):
            return metrics
        levels = {name: self.output_targets[name]["level"] for name in excluded}
        subset, atoms = structure_subset(batch, clean, levels)
        sub_out = {name: out[name][atoms if level == "atom" else clean] for name, level in levels.items()}
        all_targets = self.output_targets
        self.output_targets = {name: all_targets[name] for name in excluded}
        try:
            return super()._compute_metrics(sub_out, subset, Evaluator(self.name, excluded), metrics)
        finally:
            self.output_targets = all_targets

    # ------------------------------------------------------------- predictions
    def save_results(self, predictions, results_file, keys=None) -> None:
        # fairchem stores one-element arrays per structure, so energies come out
        # (N, 1); the OC20/OC22 evaluation servers want a flat (N,) array.
        for key, target in self.output_targets.items():
            values = predictions.get(key) if hasattr(predictions, "get") else None
            if target.get("level") == "system" and values and all(np.size(v) == 1 for v in values):
                predictions[key] = [np.asarray(v).reshape(()) for v in values]
        super().save_results(predictions, results_file, keys)

    # -------------------------------------------------------------- validation
    def validate(self, split: str = "val", disable_tqdm: bool = False):
        metrics = super().validate(split=split, disable_tqdm=disable_tqdm)
        if self.dens.enabled and self.dens.validate_denoising:
            metrics.update(self.validate_denoising(split))
        if self.config.get("task", {}).get("report_mev") and distutils.is_master():
            logging.info(f"{split} (meV units): " + _in_mev(metrics))
        return metrics

    @torch.no_grad()
    def validate_denoising(self, split: str = "val") -> dict[str, Any]:
        """Denoising metrics on a validation split, corrupted with a fixed seed.

        Every structure of every batch is corrupted (with the configured
        ``corrupt_ratio`` and sigma), so the numbers measure denoising alone
        and are comparable between checkpoints and runs.
        """
        loader = self.val_loader if split == "val" else self.test_loader
        if loader is None:
            return {}
        always = dataclasses.replace(self.dens, prob=1.0, selection="structure")
        self.model.eval()
        if self.ema:
            self.ema.store()
            self.ema.copy_to()
        metrics: dict[str, Any] = {}
        try:
            for index, batch in enumerate(loader):
                if not self.corrupt(
                    batch,
                    step=index,
                    rank=distutils.get_rank(),
                    streams=VALIDATION_STREAMS,
                    seed=self.dens.validation_seed,
                    dens=always,
                ):
                    continue
                with torch.autocast("cuda", enabled=self.scaler is not None):
                    out = super()._forward(batch)
                metrics = self.denoising_metrics(out, batch, metrics=metrics)
        finally:
            if self.ema:
                self.ema.restore()
        metrics = self.aggregate_denoising_metrics(metrics)
        if distutils.is_master():
            logging.info(", ".join(f"{split}_{k}: {v['metric']:.4f}" for k, v in metrics.items()))
        if self.logger is not None:
            self.logger.log({k: v["metric"] for k, v in metrics.items()}, step=self.step, split=split)
        return metrics

    def aggregate_denoising_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """DDP sums of denoising metrics over a fixed key list.

        fairchem's ``_aggregate_metrics`` all-reduces the keys a rank happens to hold, so a
        rank whose batches had no clean (or no corrupted) atom would call fewer collectives
        than the others; the core reduces the same keys on every rank.
        """
        return dens_metrics.aggregate(metrics, dens_metrics.metric_keys(self.output_roles), self._ranks())


def _in_mev(metrics: dict[str, Any]) -> str:
    """MAE metrics in meV (energies) and meV/Å (forces), as MD17 tables report them."""
    parts = []
    for key, value in metrics.items():
        if key.endswith("_mae") and "pos" not in key:
            unit = "meV/Å" if "force" in key else "meV"
            parts.append(f"{key}: {1000 * value['metric']:.2f} {unit}")
    return ", ".join(parts)
