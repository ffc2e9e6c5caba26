"""One target's normaliser rmsd taken from another's fit: ``forces: {mean: 0.0, rmsd: energy}``.

The MD17 DeNS code (docs/algorithm.md#md17-recipe) divides the force targets by the training-set
*energy* std, not by a force rmsd of their own. fairchem's normaliser fit knows only
numbers as overrides, so a target name given as ``rmsd`` inside
``dataset.train.transforms.normalizer.fit.targets`` is taken out before fairchem
fits, and the fitted rmsd of the named target is copied in afterwards. The config
keeps the name, so a saved checkpoint still says where the value came from.
``rmsd: null`` (``...rmsd=None`` on the command line) undoes an included tie: the
target's own rmsd is fitted, fairchem's default.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, MutableMapping

from fairchem.core.modules.normalization.normalizer import Normalizer

from fairchem_dens.trainers.guards import DeNSSetupError

__all__ = ["apply_rmsd_ties", "pop_rmsd_ties"]

KEY = "dataset.train.transforms.normalizer.fit.targets"


def _overrides(norm_config: Mapping[str, Any]) -> MutableMapping[str, Any]:
    """Per-target override values of the fit, in either of fairchem's two spellings."""
    fit = norm_config.get("fit") or {}
    if isinstance(fit.get("targets"), Mapping):
        return fit["targets"]
    return fit.get("override_values") or {}


def pop_rmsd_ties(norm_config: MutableMapping[str, Any] | None) -> dict[str, str]:
    """Takes ``rmsd: <target name>`` entries out of the fit overrides.

    Args:
        norm_config: ``dataset.train.transforms.normalizer`` (edited in place), or None.

    Returns:
        ``{target: source target}`` for each tie, to give to :func:`apply_rmsd_ties`.
    """
    fit = (norm_config or {}).get("fit")
    if not fit or fit.get("fitted"):
        return {}  # no fit (values given), or none again: the values come from the checkpoint
    ties = {}
    overrides = _overrides(norm_config)
    fitted = list(overrides) if isinstance(fit.get("targets"), Mapping) else list(fit.get("targets", []))
    for target, values in overrides.items():
        if isinstance(values, MutableMapping) and "rmsd" in values and values["rmsd"] is None:
            del values["rmsd"]  # fit it
            continue
        if not isinstance(values, Mapping) or not isinstance(values.get("rmsd"), str):
            continue
        source = values["rmsd"]
        if source == target or source not in fitted:
            raise DeNSSetupError(
                f'{KEY}.{target}.rmsd is {source!r}: a name there means "the fitted rmsd of that '
                f'target", and it must be another target of the same fit ({", ".join(t for t in fitted if t != target)})'
                f", e.g. `{target}: {{mean: 0.0, rmsd: energy}}`, or a number."
            )
        ties[target] = source
        del values["rmsd"]
    return ties


def apply_rmsd_ties(
    normalizers: MutableMapping[str, Normalizer], ties: Mapping[str, str], norm_config: MutableMapping[str, Any] | None
) -> None:
    """Sets each tied target's rmsd to its source's fitted rmsd and puts the names back in the config."""
    if not ties:
        return
    overrides = _overrides(norm_config)
    for target, source in ties.items():
        old = normalizers[target]
        normalizers[target] = Normalizer(mean=old.mean.clone(), rmsd=normalizers[source].rmsd.clone()).to(
            old.rmsd.device
        )
        overrides.setdefault(target, {})["rmsd"] = source
        # fairchem logged the untied fit already
        logging.info(
            "Normalization values for output %s: mean=%s, rmsd=%s (the rmsd of %s; replaces the value above).",
            target,
            normalizers[target].mean.item(),
            normalizers[target].rmsd.item(),
            source,
        )
