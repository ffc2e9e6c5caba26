"""DeNS settings: the ``optim`` keys of a fairchem config, read and checked in one place.

Nothing here imports a training framework: fairchem 1.x and 2.x configs carry the same
keys (``use_denoising_pos``, ``denoising_pos_coefficient``, ``denoising_pos_params``),
and both integrations read them through :meth:`DeNSConfig.from_optim`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from fairchem_dens.core.errors import DeNSConfigError

__all__ = ["DENS_KEYS", "DeNSConfig", "DeNSConfigError"]

#: The DeNS keys at the top of ``optim`` (fairchem 1.x) or of the unit's ``dens`` block (fairchem 2).
DENS_KEYS = ("use_denoising_pos", "denoising_pos_coefficient", "denoising_pos_params")
#: Keys of a fairchem ``optim`` block that look meant for DeNS: they must be one of :data:`DENS_KEYS`.
_LOOKS_LIKE_DENS = re.compile(r"^(use_)?denois|^dens_")


def in_section(text: str, section: str) -> str:
    """``text`` naming the DeNS keys under ``section``: every check names them as fairchem 1 places them
    (``optim.<key>``), fairchem 2 holds them under ``runner.train_eval_unit.dens``."""
    return text if section == "optim" else re.sub(r"\boptim\.", f"{section}.", text)


def located(error: DeNSConfigError, section: str) -> DeNSConfigError:
    """``error`` with its message :func:`in_section`."""
    return error if section == "optim" else DeNSConfigError(in_section(str(error), section))


def _nearest(key: str, known: tuple[str, ...]) -> str:
    return difflib.get_close_matches(key, known, n=1, cutoff=0.0)[0]


def _refuse_unknown_keys(keys: list[str], known: tuple[str, ...], section: str) -> None:
    for key in sorted(keys):
        raise DeNSConfigError(
            f"unknown DeNS key {section}.{key} (nearest known key: {section}.{_nearest(key, known)}); "
            f"known keys there: {', '.join(known)}. A misspelt key would leave its setting at the default."
        )


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
            :mod:`fairchem_dens.core.roles`, which checks the names).
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

    @classmethod
    def from_optim(cls, optim: dict[str, Any], section: str = "optim", only_dens_keys: bool = False) -> DeNSConfig:
        """Reads and validates the DeNS keys of a fairchem ``optim`` block.

        Args:
            optim: the ``optim`` section of a fairchem config (or a block of DeNS keys only).
            section: where the keys sit in the user's config, for the messages
                (``runner.train_eval_unit.dens`` on fairchem 2).
            only_dens_keys: every key must be one of :data:`DENS_KEYS` (fairchem 2's ``dens``
                block); otherwise only keys that look meant for DeNS are checked, since ``optim``
                also holds fairchem's own keys.

        Returns:
            The validated settings.

        Raises:
            DeNSConfigError: naming the offending key where the user wrote it.
        """
        try:
            return cls._from_optim(optim, only_dens_keys)
        except DeNSConfigError as error:
            raise located(error, section) from None

    @classmethod
    def _from_optim(cls, optim: dict[str, Any], only_dens_keys: bool) -> DeNSConfig:
        unknown = [key for key in optim if key not in DENS_KEYS and (only_dens_keys or _LOOKS_LIKE_DENS.search(key))]
        _refuse_unknown_keys(unknown, DENS_KEYS, "optim")
        if "use_denoising_pos" not in optim:
            raise DeNSConfigError(
                "optim.use_denoising_pos is missing: set it to true to train with "
                "DeNS or false to train the same model without denoising."
            )
        enabled = optim["use_denoising_pos"]
        if not isinstance(enabled, bool):
            raise DeNSConfigError(f"optim.use_denoising_pos must be true or false, got {enabled!r}")
        params = optim.get("denoising_pos_params")
        if params is None:
            if enabled:
                raise DeNSConfigError(
                    "optim.denoising_pos_params is missing (needs at least prob, "
                    "fixed_noise_std and std or std_low/std_high/num_steps)."
                )
            params = {"prob": 0.0, "fixed_noise_std": True, "std": 1.0}
        if not isinstance(params, dict):
            raise DeNSConfigError(f"optim.denoising_pos_params must be a mapping, got {type(params).__name__}")
        params = {k: _none_if_null(v) for k, v in params.items()}
        _refuse_unknown_keys(
            [k for k in params if k not in (*param_keys(), "denoising_pos_coefficient")],
            param_keys(),
            "optim.denoising_pos_params",
        )
        # The sibling key wins over a same-named field inside the params (as in both peers).
        coefficient = optim.get("denoising_pos_coefficient", params.pop("denoising_pos_coefficient", None))
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
                raise DeNSConfigError(f"{key}std_low ({self.std_low}) must not exceed {key}std_high ({self.std_high})")
            if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
                raise DeNSConfigError(
                    f"{key}num_steps must be a positive integer (rungs of the sigma ladder), got {self.num_steps!r}"
                )
        if self.selection not in ("batch", "structure"):
            raise DeNSConfigError(f"{key}selection must be 'batch' or 'structure', got {self.selection!r}")
        if self.loss_form not in ("hybrid", "separate_means"):
            raise DeNSConfigError(
                f"{key}loss_form must be 'hybrid' (OC20/OC22) or 'separate_means' (MD17), got {self.loss_form!r}"
            )
        if self.coefficient_schedule not in ("constant", "linear_decay"):
            raise DeNSConfigError(
                f"{key}coefficient_schedule must be 'constant' or 'linear_decay', got {self.coefficient_schedule!r}"
            )
        if not _is_number(self.coefficient) or self.coefficient < 0:
            raise DeNSConfigError(f"optim.denoising_pos_coefficient must be a number >= 0, got {self.coefficient!r}")
        if not isinstance(self.validation_seed, int) or isinstance(self.validation_seed, bool):
            raise DeNSConfigError(f"{key}validation_seed must be an integer, got {self.validation_seed!r}")
        if self.output_policy is not None and not isinstance(self.output_policy, dict):
            raise DeNSConfigError(
                f"{key}output_policy must map output names to original/replaced/excluded, got {self.output_policy!r}"
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
        for name, meaning in (
            ("max_force_norm", "eV/Å"),
            ("max_mean_force_norm", "eV/Å"),
            ("max_stress_norm", "eV/Å³"),
            ("early_epochs", "epochs"),
        ):
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


def param_keys() -> tuple[str, ...]:
    """The keys of ``optim.denoising_pos_params``: every field but the two top-level ``optim`` keys."""
    top_level = {"enabled", "coefficient"}  # optim.use_denoising_pos, optim.denoising_pos_coefficient
    return tuple(field.name for field in dataclasses.fields(DeNSConfig) if field.name not in top_level)
