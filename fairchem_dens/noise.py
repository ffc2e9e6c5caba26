"""The DeNS corruption: validated settings and pure, seeded sampling functions.

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
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "DeNSConfig",
    "DeNSConfigError",
    "Corruption",
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


class DeNSConfigError(ValueError):
    """A DeNS setting is missing, unknown or out of range."""


def _none_if_null(value: Any) -> Any:
    # YAML reads a capitalised `None` as the string "None" (published configs use it).
    if isinstance(value, str) and value.strip().lower() in {"none", "null", "~", ""}:
        return None
    return value


@dataclass(frozen=True)
class DeNSConfig:
    """DeNS settings, read from the ``optim`` block of a fairchem config.

    The published keys (docs/algorithm.md#settings-of-the-original-code) keep their names; the additions of this
    plugin are ``selection``, ``relaxation_only``, ``coefficient_schedule``,
    ``validate_denoising`` and ``validation_seed``.

    Attributes:
        enabled: ``optim.use_denoising_pos``, the master switch.
        prob: probability that a batch (``selection: batch``) or a structure
            (``selection: structure``) is corrupted.
        fixed_noise_std: one sigma (``std``) if true, else the geometric ladder
            ``std_low``..``std_high`` with ``num_steps`` rungs, one rung per structure.
        std: sigma of the fixed-noise mode, in Å.
        num_steps: rungs of the multi-scale ladder.
        std_low: smallest sigma of the ladder, Å.
        std_high: largest sigma of the ladder, Å; the target scale in multi-scale mode.
        corrupt_ratio: probability that an eligible atom of a corrupted structure
            is noised (partial corruption); ``None`` noises every eligible atom.
        all_atoms: also corrupt fixed atoms.
        selection: ``batch`` (OC20/OC22 recipe) or ``structure`` (MD17 recipe).
        relaxation_only: never corrupt structures whose ``md`` flag is 1 (All+MD recipe).
        coefficient: ``optim.denoising_pos_coefficient``, the weight of the noise loss.
        coefficient_schedule: ``constant`` or ``linear_decay`` (to ``coefficient_min_factor``
            times the coefficient, default 0, at the last epoch).
        validate_denoising: also report denoising metrics on the validation set.
        validation_seed: seed of the validation corruption, fixed so runs compare.
        output_policy: per-output overrides of what a DeNS batch does with an
            output (``original``, ``replaced``, ``excluded``; see
            :mod:`fairchem_dens.trainers.output_policy`, which checks the names).
        min_num_atoms: structures with fewer atoms are never corrupted.
        strict_max_ratio: a structure whose drawn corrupted fraction (of its
            eligible atoms) exceeds this is not corrupted (needs ``corrupt_ratio``).
        max_force_norm: a structure whose largest |F_i| (eV/Å) exceeds this is not corrupted.
        max_mean_force_norm: a structure whose |Σ_i F_i| (eV/Å) exceeds this is not corrupted.
        max_stress_norm: a structure whose stress Frobenius norm (eV/Å³) exceeds this
            is not corrupted (needs stress labels).
        early_epochs: DeNS only in epochs before this one (0-based epoch index < early_epochs).
        coefficient_min_factor: with ``linear_decay``, lambda_D falls linearly from its
            value to ``coefficient_min_factor`` times it at the last epoch (default 0).
        loss_form: ``hybrid`` (OC20/OC22, the original trainer: one mean over the counted
            atoms with per-atom weights lambda_D / lambda_F) or ``separate_means`` (the MD17
            recipe: lambda_F times the mean over clean atoms plus lambda_D times the mean over
            corrupted atoms, each term dropped when empty).
    """

    enabled: bool
    prob: float
    fixed_noise_std: bool
    coefficient: float
    std: float | None = None
    num_steps: int | None = None
    std_low: float | None = None
    std_high: float | None = None
    corrupt_ratio: float | None = None
    all_atoms: bool = False
    selection: Literal["batch", "structure"] = "batch"
    relaxation_only: bool = False
    coefficient_schedule: Literal["constant", "linear_decay"] = "constant"
    validate_denoising: bool = False
    validation_seed: int = 0
    output_policy: dict[str, str] | None = None
    min_num_atoms: int | None = None
    strict_max_ratio: float | None = None
    max_force_norm: float | None = None
    max_mean_force_norm: float | None = None
    max_stress_norm: float | None = None
    early_epochs: float | None = None
    coefficient_min_factor: float = 0.0
    loss_form: Literal["hybrid", "separate_means"] = "hybrid"

    PARAM_KEYS = (
        "prob",
        "fixed_noise_std",
        "std",
        "num_steps",
        "std_low",
        "std_high",
        "corrupt_ratio",
        "all_atoms",
        "selection",
        "relaxation_only",
        "coefficient_schedule",
        "validate_denoising",
        "validation_seed",
        "output_policy",
        "min_num_atoms",
        "strict_max_ratio",
        "max_force_norm",
        "max_mean_force_norm",
        "max_stress_norm",
        "early_epochs",
        "coefficient_min_factor",
        "loss_form",
    )

    @classmethod
    def from_optim(cls, optim: dict[str, Any]) -> DeNSConfig:
        """Reads and validates the DeNS keys of a fairchem ``optim`` block.

        Args:
            optim: the ``optim`` section of a fairchem config.

        Returns:
            The validated settings.

        Raises:
            DeNSConfigError: naming the offending key.
        """
        if "use_denoising_pos" not in optim:
            raise DeNSConfigError(
                "optim.use_denoising_pos is missing: set it to true to train with "
                "DeNS or false to train the same model without denoising."
            )
        enabled = optim["use_denoising_pos"]
        if not isinstance(enabled, bool):
            raise DeNSConfigError(
                f"optim.use_denoising_pos must be true or false, got {enabled!r}"
            )
        params = optim.get("denoising_pos_params")
        if params is None:
            if enabled:
                raise DeNSConfigError(
                    "optim.denoising_pos_params is missing (needs at least prob, "
                    "fixed_noise_std and std or std_low/std_high/num_steps)."
                )
            params = {"prob": 0.0, "fixed_noise_std": True, "std": 1.0}
        if not isinstance(params, dict):
            raise DeNSConfigError(
                f"optim.denoising_pos_params must be a mapping, got {type(params).__name__}"
            )
        params = {k: _none_if_null(v) for k, v in params.items()}
        unknown = sorted(set(params) - set(cls.PARAM_KEYS) - {"denoising_pos_coefficient"})
        if unknown:
            raise DeNSConfigError(
                f"unknown key(s) in optim.denoising_pos_params: {', '.join(unknown)}; "
                f"allowed: {', '.join(cls.PARAM_KEYS)}"
            )
        # The sibling key wins over a same-named field inside the params (as in both peers).
        coefficient = optim.get(
            "denoising_pos_coefficient", params.pop("denoising_pos_coefficient", None)
        )
        params.pop("denoising_pos_coefficient", None)
        if coefficient is None:
            if enabled:
                raise DeNSConfigError(
                    "optim.denoising_pos_coefficient is missing: the weight of the "
                    "denoising loss (10 in the OC20 recipes)."
                )
            coefficient = 0.0
        if "fixed_noise_std" not in params:
            raise DeNSConfigError(
                "optim.denoising_pos_params.fixed_noise_std is missing: set true for "
                "one sigma (std) or false for the multi-scale ladder "
                "(std_low, std_high, num_steps). It has no default here because the "
                "original code silently falls back to multi-scale noise."
            )
        config = cls(enabled=enabled, coefficient=coefficient, **params)
        config.validate()
        return config

    def validate(self) -> None:
        """Checks every value; raises :class:`DeNSConfigError` naming the key."""
        key = "optim.denoising_pos_params."
        for name in ("fixed_noise_std", "all_atoms", "relaxation_only", "validate_denoising"):
            if not isinstance(getattr(self, name), bool):
                raise DeNSConfigError(f"{key}{name} must be true or false, got {getattr(self, name)!r}")
        _check_probability(key + "prob", self.prob, required=True)
        _check_probability(key + "corrupt_ratio", self.corrupt_ratio, required=False)
        for name, what in (("prob", "no batch or structure"), ("corrupt_ratio", "no atom")):
            if self.enabled and getattr(self, name) == 0:
                raise DeNSConfigError(
                    f"{key}{name} is 0 while optim.use_denoising_pos is true: {what} would ever be "
                    f"corrupted, so DeNS would be off without a word. Set {name} in (0, 1], or set "
                    "optim.use_denoising_pos: False to train without DeNS."
                )
        if self.fixed_noise_std:
            _check_positive(key + "std", self.std, "the sigma of the noise in Å")
        else:
            _check_positive(key + "std_low", self.std_low, "the smallest sigma in Å")
            _check_positive(key + "std_high", self.std_high, "the largest sigma in Å")
            if self.std_low > self.std_high:
                raise DeNSConfigError(
                    f"{key}std_low ({self.std_low}) must not exceed {key}std_high ({self.std_high})"
                )
            if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
                raise DeNSConfigError(
                    f"{key}num_steps must be a positive integer (rungs of the sigma ladder), got {self.num_steps!r}"
                )
        if self.selection not in ("batch", "structure"):
            raise DeNSConfigError(
                f"{key}selection must be 'batch' or 'structure', got {self.selection!r}"
            )
        if self.loss_form not in ("hybrid", "separate_means"):
            raise DeNSConfigError(
                f"{key}loss_form must be 'hybrid' (OC20/OC22) or 'separate_means' (MD17), got {self.loss_form!r}"
            )
        if self.coefficient_schedule not in ("constant", "linear_decay"):
            raise DeNSConfigError(
                f"{key}coefficient_schedule must be 'constant' or 'linear_decay', got {self.coefficient_schedule!r}"
            )
        if not _is_number(self.coefficient) or self.coefficient < 0:
            raise DeNSConfigError(
                f"optim.denoising_pos_coefficient must be a number >= 0, got {self.coefficient!r}"
            )
        if not isinstance(self.validation_seed, int) or isinstance(self.validation_seed, bool):
            raise DeNSConfigError(f"{key}validation_seed must be an integer, got {self.validation_seed!r}")
        if self.output_policy is not None and not isinstance(self.output_policy, dict):
            raise DeNSConfigError(
                f"{key}output_policy must map output names to original/replaced/excluded, "
                f"got {self.output_policy!r}"
            )

        if self.min_num_atoms is not None and (
            not isinstance(self.min_num_atoms, int) or isinstance(self.min_num_atoms, bool) or self.min_num_atoms < 1
        ):
            raise DeNSConfigError(f"{key}min_num_atoms must be a positive integer, got {self.min_num_atoms!r}")
        if self.strict_max_ratio is not None:
            if self.corrupt_ratio is None:
                raise DeNSConfigError(
                    f"{key}strict_max_ratio caps the corrupted fraction of partial corruption: "
                    f"it needs {key}corrupt_ratio"
                )
            _check_probability(key + "strict_max_ratio", self.strict_max_ratio, required=True)
        for name, meaning in (("max_force_norm", "eV/Å"), ("max_mean_force_norm", "eV/Å"),
                              ("max_stress_norm", "eV/Å³"), ("early_epochs", "epochs")):
            if getattr(self, name) is not None:
                _check_positive(key + name, getattr(self, name), meaning)
        _check_probability(key + "coefficient_min_factor", self.coefficient_min_factor, required=True)
        if self.coefficient_min_factor > 0 and self.coefficient_schedule != "linear_decay":
            raise DeNSConfigError(
                f"{key}coefficient_min_factor is the floor of the linear decay: set "
                f"{key}coefficient_schedule: linear_decay"
            )

    def active_in_epoch(self, epoch_index: int) -> bool:
        """Whether DeNS corrupts in this (0-based) epoch: ``enabled`` and before ``early_epochs``."""
        return self.enabled and (self.early_epochs is None or epoch_index < self.early_epochs)

    def decision_rank(self, rank: int) -> int:
        """The rank that seeds the structure-selection stream.

        ``selection: batch`` draws one decision that every DDP rank must share
        (rank 0's stream everywhere); ``selection: structure`` draws one decision
        per structure, which must differ between ranks or ranks with equal batch
        sizes would corrupt the same positions.
        """
        return rank if self.selection == "structure" else 0

    @property
    def target_std(self) -> float:
        """sigma_N: the noise target is ``noise / target_std`` (docs/algorithm.md#targets-and-normalisation)."""
        return float(self.std if self.fixed_noise_std else self.std_high)

    def coefficient_at(self, epoch: float, max_epochs: float) -> float:
        """The denoising loss weight at a (fractional) epoch.

        Args:
            epoch: epochs done so far (fractional).
            max_epochs: length of the training run in epochs.
        """
        if self.coefficient_schedule == "constant":
            return float(self.coefficient)
        progress = min(max(epoch / max(max_epochs, 1e-12), 0.0), 1.0)
        return float(self.coefficient) * (1.0 - (1.0 - self.coefficient_min_factor) * progress)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probability(key: str, value: Any, required: bool) -> None:
    if value is None and not required:
        return
    if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise DeNSConfigError(f"{key} must be a probability in [0, 1], got {value!r}")


def _check_positive(key: str, value: Any, meaning: str) -> None:
    if value is None:
        raise DeNSConfigError(f"{key} is missing ({meaning})")
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise DeNSConfigError(f"{key} must be a positive number ({meaning}), got {value!r}")


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
    return torch.exp(
        torch.linspace(math.log(std_low), math.log(std_high), num_steps)
    ).to(torch.float32)


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
            f"optim.denoising_pos_params.relaxation_only is set but {where} gives no `md` flag: use "
            "fairchem_dens.datasets.lmdb_dataset.DeNSLmdbDataset or store `md` in the entries."
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
            values["max_mean_force_norm"] = torch.zeros(num_structures, 3).index_add_(0, batch_index, forces).norm(dim=-1)
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


def eligible_atoms(config: DeNSConfig, selected: torch.Tensor, batch_index: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
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
    selected = select_structures(
        config, num_structures, decision_gen, None if md is None else md.cpu()
    )
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
