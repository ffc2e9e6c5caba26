"""Checks the DeNS trainer runs before step 1, each naming the key and the fix.

Each function raises :class:`DeNSSetupError` with a message for the user; the
trainer calls them from the ``load_*`` step that has what the check needs.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from fairchem_dens.core.corruption import SKIP_FILTERS, passes_skip_filter, require_md, require_stress
from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.core.roles import ENERGY, FORCES, GRADIENT_OUTPUTS, STRESS
from fairchem_dens.models.adapters import adapters, gradient_force_heads, is_dens_conservative, noise_blocks

__all__ = [
    "DeNSSetupError",
    "check_denoising_splits",
    "check_gradient_normalizers",
    "check_loss_functions",
    "check_model",
    "check_normalizers",
    "check_skip_filters",
    "check_training_sample",
    "check_warmup",
]


def use_instead() -> str:
    """The DeNS classes of every backbone adapter, for messages."""
    return "use " + ", or ".join(candidate.use_instead() for candidate in adapters())


def _gradient_force_classes() -> tuple[type, ...]:
    """The gradient-force heads the adapters name, those fairchem has registered so far."""
    from fairchem.core.common.registry import registry

    classes = []
    for name in gradient_force_heads():
        cls = registry.mapping["model_name_mapping"].get(name)
        if cls is not None:
            classes.append(cls)
    return tuple(classes)


def _is_conservative(module: nn.Module, backbone: nn.Module | None) -> bool:
    if isinstance(module, _gradient_force_classes()):
        return True
    # fairchem's gradient-force models and backbones say so with direct_forces=False.
    owner = backbone if backbone is not None else module
    return bool(getattr(owner, "regress_forces", False)) and getattr(owner, "direct_forces", True) is False


def check_model(model: nn.Module, forces: str = FORCES) -> None:
    """Refuses a model that cannot denoise.

    DeNS needs a backbone that encodes the original forces (a ``force_embedding``)
    and a force head with a noise block (an attribute an adapter lists in
    ``noise_blocks``) that writes the noise prediction of corrupted atoms to the
    ``forces`` output. Gradient-force heads (the adapters' ``gradient_force_heads``, or
    ``direct_forces=False``) are accepted only when they are conservative DeNS heads
    (``dens_conservative``): others have no noise path, and fairchem's eSEN DeNS head
    zeroes the energy of DeNS batches.

    Args:
        model: the model as built by fairchem (DDP wrapper removed).
        forces: name of the force output.
    """
    backbone = getattr(model, "backbone", None)
    heads = getattr(model, "output_heads", None)
    if backbone is None or heads is None:
        raise DeNSSetupError(
            f"model.name builds {type(model).__name__}, which is not fairchem's `hydra` "
            f"model: the DeNS trainer needs a hydra backbone with DeNS heads; {use_instead()}."
        )
    # a conservative head writes energy, forces (and stress) whatever its name
    force_heads = [
        head
        for name, head in heads.items()
        if name == forces
        or getattr(head, "output_name", None) == forces
        or isinstance(head, _gradient_force_classes())
        or is_dens_conservative(head)
    ]
    for head in force_heads or heads.values():
        if not _is_conservative(head, backbone) or is_dens_conservative(head):
            continue
        name = f"{type(head).__module__}.{type(head).__name__}"
        if hasattr(head, "denoising_linear"):  # fairchem's esen_mlp_efs_head_dens
            raise DeNSSetupError(
                f"the conservative head is {name}, which multiplies the energy of every DeNS batch by 0, "
                "so energy, clean-atom forces and stress get no gradient there: use "
                "fairchem_dens.models.esen.DeNSeSENConservativeHead (same weights), which keeps them."
            )
        raise DeNSSetupError(
            f"the model's forces are gradients of its energy ({name}, a conservative head without a "
            "noise output): DeNS needs a noise prediction for corrupted atoms. Use a conservative DeNS "
            "head (eSEN: fairchem_dens.models.esen.DeNSeSENConservativeHead), or pre-train with a direct "
            f"DeNS head and fine-tune conservatively without DeNS (docs/esen.md#the-two-step-recipe); {use_instead()}."
        )
    if not hasattr(backbone, "force_embedding"):
        raise DeNSSetupError(
            f"model.backbone.model builds {type(backbone).__name__}, which has no force encoding: "
            f"DeNS feeds the original forces of corrupted atoms to the backbone; {use_instead()}."
        )
    if not force_heads:
        raise DeNSSetupError(
            f"no head of the model writes the `{forces}` output (heads: {', '.join(heads)}): "
            f"name the force head `{forces}` under model.heads; {use_instead()}."
        )
    blocks = noise_blocks()
    for head in force_heads:
        if not any(hasattr(head, block) for block in blocks):
            raise DeNSSetupError(
                f"the `{forces}` head is {type(head).__module__}.{type(head).__name__}, which has no "
                f"noise output ({' / '.join(blocks)}): {use_instead()}."
            )


def check_normalizers(normalizers: Mapping[str, Any], samples: str) -> None:
    """Refuses a normaliser whose rmsd is 0 or not finite.

    A zero rmsd divides every target by 0, so step 1 fails with a NaN loss; it is
    what a fit on a single frame or on all-equal labels gives. A NaN rmsd comes
    from NaN labels (entries the fit's worker processes read and no check saw).

    Args:
        normalizers: fairchem's normalisers by target name.
        samples: how many samples the fit saw, in words, for the message.
    """
    for name, normalizer in normalizers.items():
        rmsd = getattr(normalizer, "rmsd", None)
        if rmsd is None:
            continue
        value = float(rmsd)
        if not math.isfinite(value):
            raise DeNSSetupError(
                f"the normalizer of `{name}` has rmsd {value} ({samples}): the `{name}` labels it was fitted on "
                "hold NaN/inf values. Fix or drop those entries (a fit with "
                "dataset.train.transforms.normalizer.fit.num_workers: 0 names them)."
            )
        if value <= 0.0:
            raise DeNSSetupError(
                f"the normalizer of `{name}` has rmsd {value} ({samples}): every `{name}` target "
                "would be divided by it and the first step's loss would be NaN. Check that the "
                "training set holds more than one frame with different labels (fairchem's "
                "`ase_read` format reads only the first frame of a file; use `ase_read_multi`), "
                f"or set dataset.train.transforms.normalizer.{name}.rmsd by hand."
            )


def is_conservative_model(model: nn.Module) -> bool:
    """Whether a hydra model's forces are gradients of its energy (fairchem's or our DeNS heads)."""
    backbone, heads = getattr(model, "backbone", None), getattr(model, "output_heads", None) or {}
    return any(_is_conservative(head, backbone) or is_dens_conservative(head) for head in heads.values())


def check_gradient_normalizers(model: nn.Module, normalizers: Mapping[str, Any], outputs: Iterable[str]) -> None:
    """Refuses force / stress normalisers that a gradient-force model cannot match.

    A conservative head differentiates its *normalised* energy, so its forces and stress
    come out in units of the energy's rmsd (1 without an energy normaliser) with no
    offset. A force normaliser with another rmsd or a non-zero mean gives targets no
    gradient of any energy can fit; training runs but the forces are scaled wrongly.

    Args:
        model: the model as built by fairchem (DDP wrapper removed).
        normalizers: fairchem's normalisers by target name.
        outputs: the config's output names (only trained outputs are checked).
    """
    if not is_conservative_model(model):
        return
    energy = normalizers.get(ENERGY)
    energy_rmsd = float(energy.rmsd) if energy is not None else 1.0
    trained = set(outputs)
    for name in (name for name in GRADIENT_OUTPUTS if name in trained):
        normalizer = normalizers.get(name)
        if normalizer is None:
            if energy is None:
                continue
            mean, rmsd = 0.0, 1.0
        else:
            mean, rmsd = float(normalizer.mean), float(normalizer.rmsd)
        if mean == 0.0 and math.isclose(rmsd, energy_rmsd, rel_tol=1e-6):
            continue
        fix = (
            "`{name}: {{mean: 0.0, rmsd: energy}}` under dataset.train.transforms.normalizer.fit.targets"
            if energy is not None
            else "`{name}: {{mean: 0.0, rmsd: 1.0}}` (or no `{name}` normalizer)"
        ).format(name=name)
        raise DeNSSetupError(
            f"the model's `{name}` output is a gradient of its normalised energy, so it comes out in units of the "
            f"energy normalizer's rmsd ({energy_rmsd:.6g}{'' if energy is not None else ': no energy normalizer'}) "
            f"with mean 0, but the `{name}` normalizer has mean {mean:.6g} and rmsd {rmsd:.6g}: no energy "
            f"could fit those targets. Set {fix}."
        )


def check_warmup(scheduler_params: Mapping[str, Any], steps_per_epoch: int) -> None:
    """Refuses a warm-up of fewer than one step for fairchem's EquiformerV2 LR lambdas.

    fairchem's cosine and multistep lambdas divide by the warm-up length in steps,
    ``int(warmup_epochs * steps_per_epoch)``, so a length of 0 raises
    ``ZeroDivisionError`` when the scheduler is built.

    Args:
        scheduler_params: ``optim.scheduler_params`` (still in epochs).
        steps_per_epoch: optimizer steps per epoch on this rank.
    """
    if scheduler_params.get("lambda_type") not in ("cosine", "multistep"):
        return
    epochs = scheduler_params.get("warmup_epochs")
    if not isinstance(epochs, (int, float)) or isinstance(epochs, bool):
        raise DeNSSetupError(f"optim.scheduler_params.warmup_epochs must be a number of epochs, got {epochs!r}")
    steps = int(epochs * steps_per_epoch)
    if steps < 1:
        needed = math.ceil(1e6 / steps_per_epoch) / 1e6
        raise DeNSSetupError(
            f"optim.scheduler_params.warmup_epochs = {epochs} epochs x {steps_per_epoch} steps per "
            f"epoch = {steps} warm-up steps; fairchem's {scheduler_params['lambda_type']} LR schedule "
            f"divides by the warm-up length. Set warmup_epochs >= {needed:g} (one step), or "
            "warmup_factor: 1.0 with warmup_epochs of one step for no warm-up."
        )


def check_skip_filters(dens, values: Mapping[str, Iterable[float]], source: str) -> None:
    """Refuses skip filters that let no training structure through: DeNS would never corrupt one.

    Args:
        dens: the DeNS settings (:class:`fairchem_dens.core.settings.DeNSConfig`).
        values: per filter key, its quantity for every training structure
            (:func:`fairchem_dens.core.corruption.skip_filter_values`, as the normaliser fit read them).
        source: the training set's ``src``, for the message.
    """
    values = {key: torch.tensor(list(entries)) for key, entries in values.items()}
    if not values or not all(entries.numel() for entries in values.values()):
        return
    passed = {key: passes_skip_filter(dens, key, entries) for key, entries in values.items()}
    if bool(torch.stack(list(passed.values())).all(dim=0).any()):
        return
    alone = [key for key in values if not bool(passed[key].any())]
    culprits = alone or list(values)

    def described(key: str) -> str:
        what, unit = SKIP_FILTERS[key]
        nearest = (
            f"the largest has {int(values[key].max())} {what}"
            if key == "min_num_atoms"
            else f"the smallest per-structure {what} is {float(values[key].min()):.4g}{unit}"
        )
        return f"optim.denoising_pos_params.{key}={getattr(dens, key)}{unit} ({nearest})"

    verb = "excludes" if len(culprits) == 1 else "each exclude" if alone else "together exclude"
    raise DeNSSetupError(
        f"{' and '.join(described(key) for key in culprits)} {verb} every training structure of {source} "
        f"({values[culprits[0]].numel()} structures): DeNS would never corrupt one. Loosen the filter, or set "
        "optim.use_denoising_pos: False to train without DeNS."
    )


def check_loss_functions(loss_functions: Iterable[Mapping[str, Any]]) -> None:
    """Refuses a per-structure loss on the forces: DeNS trains the noise per atom through it."""
    for target, loss in (next(iter(entry.items())) for entry in loss_functions):
        if target == FORCES and loss.get("fn") == "per_atom_mae":
            raise DeNSSetupError(
                "loss_functions.forces.fn is per_atom_mae, a loss for per-structure scalars; "
                "DeNS trains the noise per atom through the forces loss: use l2mae (the "
                "published recipes), mae or mse."
            )


def check_training_sample(dens, sample: Any, trained: Iterable[str], source: str) -> None:
    """Refuses a training set whose entries lack what DeNS or the loss reads.

    Args:
        dens: the DeNS settings.
        sample: the training set's first entry.
        trained: the outputs the loss trains.
        source: the training set's ``src``, for the message.
    """
    if getattr(sample, FORCES, None) is None:
        raise DeNSSetupError(
            f"training dataset {source} has no `forces` in its entries: DeNS encodes the forces of the "
            "original structure and trains a force head, so it needs S2EF data with forces (check key_mapping)."
        )
    for name in trained:
        if getattr(sample, name, None) is None:
            raise DeNSSetupError(
                f"loss_functions trains `{name}` but the training dataset {source} has no `{name}` "
                "in its entries: read it from the data (ase_db/ase_read_multi: a2g_args "
                "{r_energy, r_forces, r_stress: True}; stress parts come from the decompose_tensor "
                "transform) or remove the output."
            )
    require_stress(dens, getattr(sample, STRESS, None), f"the training dataset {source}")
    require_md(dens, getattr(sample, "md", None), f"the training dataset {source}")


def check_denoising_splits(dens, samples: Mapping[str, tuple[Any, str]]) -> None:
    """With ``validate_denoising`` and ``relaxation_only``, refuses val/test entries without ``md`` flags.

    Args:
        dens: the DeNS settings.
        samples: ``{split: (first entry, src)}`` of the evaluated splits.
    """
    if not (dens.enabled and dens.validate_denoising and dens.relaxation_only):
        return
    for split, (sample, source) in samples.items():
        if getattr(sample, "md", None) is None:
            raise DeNSSetupError(
                "optim.denoising_pos_params.validate_denoising and relaxation_only are set "
                f"but the {split} dataset {source} gives no `md` flag: use "
                "fairchem_dens.datasets.lmdb_dataset.DeNSLmdbDataset for that split too, or turn "
                "validate_denoising off."
            )
