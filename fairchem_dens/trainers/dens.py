"""The DeNS trainer: fairchem's EquiformerV2 forces trainer plus denoising.

Only four methods of fairchem's trainer change:

* ``_forward`` corrupts the batch when the model is in training mode (the only
  place fairchem calls it in training mode is ``train()``), so validation,
  prediction and relaxations never see noise;
* ``_compute_loss`` replaces the force term of DeNS batches by the denoising
  term of the original implementation (SPEC A.9) and names any non-finite term;
* ``_compute_metrics`` reports ``denoising_*`` metrics for DeNS batches;
* ``validate`` optionally adds denoising metrics under a fixed seed.

Everything else (data loading, DDP, EMA, AMP, clipping, schedulers,
checkpoints, prediction files) is fairchem's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import (
    EquiformerV2ForcesTrainer,
)
from fairchem.core.modules.normalization.normalizer import Normalizer

from fairchem_dens.models.checkpoints import (
    CheckpointMismatchError,
    checkpoint_family,
    convert_original_checkpoint,
    explain_mismatch,
    normalize_fork_keys,
    read_checkpoint,
    strip_ddp_prefix,
)
from fairchem_dens.models.dens_features import is_dens_batch
from fairchem_dens.noise import (
    DECISION_STREAM,
    NOISE_STREAM,
    VALIDATION_STREAM,
    DeNSConfig,
    sample_corruption,
    step_generator,
)

__all__ = ["DeNSTrainer", "NonFiniteLossError"]

FORCES = "forces"
ENERGY = "energy"
NOISE_TARGET = "denoising_pos_target"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


@registry.register_trainer("fairchem_dens_trainer")
class DeNSTrainer(EquiformerV2ForcesTrainer):
    """EquiformerV2/eSCN S2EF training with DeNS as an auxiliary task.

    Takes fairchem's trainer arguments unchanged; the DeNS settings come from
    ``optim`` (see :class:`fairchem_dens.noise.DeNSConfig`) and are validated
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
        if kwargs.get("name", "ocp") == "ocp":
            kwargs["name"] = "s2ef"
        super().__init__(*args, **kwargs)
        # Inference needs no DeNS logic; a registered plain trainer name lets
        # fairchem's ASE calculator rebuild a trainer from our checkpoints.
        self.config["trainer"] = "forces"

    # ------------------------------------------------------------------ setup
    def load_datasets(self) -> None:
        super().load_datasets()
        if self.train_dataset is not None and len(self.train_dataset) > 0:
            sample = self.train_dataset[0]
            source = self.config["dataset"].get("src")
            if getattr(sample, FORCES, None) is None:
                raise ValueError(
                    f"training dataset {source} has no `forces` in its entries: DeNS "
                    "encodes the forces of the original structure and trains a force "
                    "head, so it needs S2EF data with forces (check key_mapping)."
                )
            if self.dens.relaxation_only and getattr(sample, "md", None) is None:
                raise ValueError(
                    f"optim.denoising_pos_params.relaxation_only is set but the training "
                    f"dataset {source} gives no `md` flag: use "
                    "fairchem_dens.datasets.lmdb_dataset.DeNSLmdbDataset or store `md` in the entries."
                )

    def load_references_and_normalizers(self) -> None:
        super().load_references_and_normalizers()
        # Saved with the checkpoint under the name both published implementations use.
        self.normalizers[NOISE_TARGET] = Normalizer(
            mean=0.0, rmsd=float(self.dens.target_std)
        ).to(self.device)

    # ------------------------------------------------------------- checkpoints
    def load_checkpoint(self, checkpoint_path: str, checkpoint: dict | None = None, inference_only: bool = False) -> None:
        """fairchem's loader, plus original-DeNS checkpoints and readable mismatch errors.

        The file is read with ``weights_only=True``. A checkpoint of the original
        implementation is converted on the fly (see
        :func:`fairchem_dens.models.checkpoints.convert_original_checkpoint`).
        """
        if checkpoint is None:
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
                raise CheckpointMismatchError(
                    f"{checkpoint_path} does not fit the model of this config:\n{problems}"
                )
        super().load_checkpoint(
            checkpoint_path, checkpoint={**checkpoint, "state_dict": state}, inference_only=inference_only
        )

    # -------------------------------------------------------------- corruption
    def _forward(self, batch):
        if self.model.training and self.dens.enabled:
            self.corrupt(batch, step=self.step, rank=distutils.get_rank())
        return super()._forward(batch)

    def corrupt(self, batch, step: int, rank: int = 0, stream: int | None = None, seed: int | None = None) -> bool:
        """Corrupts ``batch`` in place (CPU, before it is moved to the device).

        Args:
            batch: the collated batch.
            step: the global step; with ``seed`` it determines every draw.
            rank: DDP rank (mask and noise differ per rank, the batch-level
                decision does not).
            stream: decision stream override (validation uses its own).
            seed: seed override (default: the run's ``--seed``).

        Returns:
            True if the batch became a DeNS batch.
        """
        if seed is None:
            seed = self.config["cmd"].get("seed") or 0
        decision_stream = DECISION_STREAM if stream is None else stream
        noise_stream = NOISE_STREAM if stream is None else stream + 100
        corruption = sample_corruption(
            self.dens,
            batch.batch,
            batch.fixed,
            step_generator(seed, step, decision_stream),
            step_generator(seed, step, noise_stream, rank),
            md=getattr(batch, "md", None),
            num_structures=batch.natoms.numel(),
        )
        if not corruption.active:
            return False
        device = batch.pos.device
        batch.pos = batch.pos + corruption.noise.to(device, batch.pos.dtype)
        batch.noise_vec = corruption.noise.to(device)
        batch.denoising_target = corruption.target.to(device)
        batch.sigmas = corruption.sigmas.to(device)
        if not bool(corruption.mask.all()):
            batch.noise_mask = corruption.mask.to(device)
        batch.denoising_pos_forward = True
        return True

    # -------------------------------------------------------------------- loss
    def _compute_loss(self, out, batch) -> torch.Tensor:
        terms = {}
        all_loss_functions = self.loss_functions
        try:
            for loss_fn in all_loss_functions:
                target_name = loss_fn[0]
                if target_name == FORCES and is_dens_batch(batch):
                    terms["denoising"] = self._denoising_loss(out, batch, loss_fn[1])
                    continue
                # fairchem's own loss, one target at a time, so a bad term can be named.
                self.loss_functions = [loss_fn]
                terms[target_name] = super()._compute_loss(out, batch)
        finally:
            self.loss_functions = all_loss_functions
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(
                    f"the {name} loss is {value.item()} at step {self.step} (epoch "
                    f"{self.epoch:.3f}); stopping before the weights are updated. "
                    "Lower the learning rate, check the data, or resume from the last checkpoint."
                )
        return sum(terms.values())

    def _loss_atoms(self, batch, corrupted: torch.Tensor) -> torch.Tensor:
        """Atoms that enter the force/denoising loss."""
        if self.output_targets[FORCES].get("train_on_free_atoms", True):
            free = batch.fixed == 0
            return free | corrupted if self.dens.all_atoms else free
        return torch.ones_like(corrupted)

    def _denoising_loss(self, out, batch, loss_info: dict[str, Any]) -> torch.Tensor:
        """Denoising term of a DeNS batch (SPEC A.9, original semantics)."""
        pred = out[FORCES]
        corrupted = getattr(batch, "noise_mask", None)
        if corrupted is None:
            corrupted = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
        atoms = self._loss_atoms(batch, corrupted)
        weight = self.dens.coefficient_at(self.epoch, self.config["optim"]["max_epochs"])
        if bool(corrupted[atoms].all()):
            # Full corruption: the configured force loss on the noise, weighted by lambda_D.
            natoms = torch.repeat_interleave(batch.natoms, batch.natoms)[atoms]
            return weight * loss_info["fn"](
                pred[atoms], batch.denoising_target[atoms], natoms=natoms
            )
        # Partial corruption: corrupted atoms predict noise (weight lambda_D), the
        # others their forces (weight lambda_F); L2 norm, mean over DDP-global atoms.
        force_target = batch.forces.to(pred.dtype)
        if FORCES in self.normalizers:
            force_target = self.normalizers[FORCES].norm(force_target)
        target = torch.where(corrupted.view(-1, 1), batch.denoising_target, force_target)
        weights = torch.where(
            corrupted,
            torch.as_tensor(weight, dtype=pred.dtype, device=pred.device),
            torch.as_tensor(float(loss_info["coefficient"]), dtype=pred.dtype, device=pred.device),
        )
        per_atom = weights[atoms] * torch.linalg.vector_norm(pred[atoms] - target[atoms], dim=-1)
        global_count = distutils.all_reduce(per_atom.numel(), device=pred.device)
        return per_atom.sum() * distutils.get_world_size() / global_count

    # ----------------------------------------------------------------- metrics
    def _compute_metrics(self, out, batch, evaluator, metrics=None):
        if not is_dens_batch(batch):
            return super()._compute_metrics(out, batch, evaluator, metrics)
        return self.denoising_metrics(out, batch, evaluator, metrics)

    def denoising_metrics(self, out, batch, evaluator, metrics=None) -> dict[str, Any]:
        """``denoising_energy_mae`` (eV), ``denoising_pos_mae`` (Å), ``denoising_force_mae`` (eV/Å)."""
        metrics = {} if metrics is None else metrics
        with torch.no_grad():
            energy = self._denorm_preds(ENERGY, out[ENERGY].detach().float(), batch).view(-1)
            energy_error = (energy - batch.energy.view(-1).to(energy)).abs()
            _update(evaluator, metrics, "denoising_energy_mae", energy_error)

            pred = out[FORCES].detach().float()
            corrupted = getattr(batch, "noise_mask", None)
            if corrupted is None:
                corrupted = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
            evaluated = corrupted.clone()
            if self.output_targets[FORCES].get("eval_on_free_atoms", True):
                free = batch.fixed == 0
                evaluated = free | corrupted if self.dens.all_atoms else free
            noise_pred = self.normalizers[NOISE_TARGET].denorm(pred)
            noise_error = (noise_pred - batch.noise_vec.to(pred)).abs()[corrupted & evaluated]
            _update(evaluator, metrics, "denoising_pos_mae", noise_error)
            clean = ~corrupted & evaluated
            if bool(clean.any()):
                force_pred = self._denorm_preds(FORCES, pred, batch)
                force_error = (force_pred - batch.forces.to(pred)).abs()[clean]
                _update(evaluator, metrics, "denoising_force_mae", force_error)
        return metrics

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
        saved, self.dens = self.dens, always
        self.model.eval()
        if self.ema:
            self.ema.store()
            self.ema.copy_to()
        metrics: dict[str, Any] = {}
        try:
            for index, batch in enumerate(loader):
                if not self.corrupt(
                    batch, step=index, rank=distutils.get_rank(),
                    stream=VALIDATION_STREAM, seed=self.dens.validation_seed,
                ):
                    continue
                with torch.autocast("cuda", enabled=self.scaler is not None):
                    out = super()._forward(batch)
                metrics = self.denoising_metrics(out, batch, self.evaluator, metrics)
        finally:
            self.dens = saved
            if self.ema:
                self.ema.restore()
        metrics = self._aggregate_metrics(metrics)
        if distutils.is_master():
            logging.info(
                ", ".join(f"{split}_{k}: {v['metric']:.4f}" for k, v in metrics.items())
            )
        if self.logger is not None:
            self.logger.log({k: v["metric"] for k, v in metrics.items()}, step=self.step, split=split)
        return metrics


def _in_mev(metrics: dict[str, Any]) -> str:
    """MAE metrics in meV (energies) and meV/Å (forces), as MD17 tables report them."""
    parts = []
    for key, value in metrics.items():
        if key.endswith("_mae") and "pos" not in key:
            unit = "meV/Å" if "force" in key else "meV"
            parts.append(f"{key}: {1000 * value['metric']:.2f} {unit}")
    return ", ".join(parts)


def _update(evaluator, metrics: dict[str, Any], key: str, errors: torch.Tensor) -> None:
    if errors.numel() == 0:
        return
    total = float(errors.sum())
    evaluator.update(key, {"total": total, "numel": errors.numel(), "metric": total / errors.numel()}, metrics)
