"""The backbone adapters: what fairchem-dens needs to know about each architecture.

A backbone is one module under ``fairchem_dens/models/`` that defines its DeNS
backbone class (where the force encoding enters the base class's unchanged
``forward``), its heads (which block predicts forces, which the noise) and an
``ADAPTER`` (:class:`BackboneAdapter`) saying how its checkpoints are recognised,
which classes a config names, what its noise block is called and which of fairchem's
heads give its forces as energy gradients. :data:`BACKBONE_MODULES` is the one place a
new module is listed; checkpoint conversion, mismatch messages and the trainer's model
check (``trainers/guards.py``) read the adapters from here and nothing else.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Iterable

__all__ = [
    "BackboneAdapter",
    "BACKBONE_MODULES",
    "DENS_CONSERVATIVE",
    "OTHER_GRADIENT_FORCE_HEADS",
    "adapters",
    "adapter",
    "backbone_keys",
    "family_of_keys",
    "gradient_force_heads",
    "is_dens_conservative",
    "is_hydra",
    "noise_blocks",
]

#: The adapter modules, in the order their families are tried on a checkpoint.
BACKBONE_MODULES = (
    "fairchem_dens.models.equiformer_v2",
    "fairchem_dens.models.escn",
    "fairchem_dens.models.esen",
)

#: The class attribute (set to True) by which a head says it is a conservative DeNS head:
#: its forces are energy gradients and it also predicts the noise of corrupted atoms.
DENS_CONSERVATIVE = "dens_conservative"

#: fairchem 1.10 heads whose forces are -dE/dx, of architectures without a DeNS adapter
#: (registry names), so the model check calls them conservative instead of only
#: reporting the missing force encoding.
OTHER_GRADIENT_FORCE_HEADS = (
    "gemnet_oc_energy_and_grad_force_head",
    "gemnet_t_energy_and_grad_force_head",
    "dimenetplusplus_energy_and_force_head",
)


@dataclass(frozen=True)
class BackboneAdapter:
    """How one architecture plugs into fairchem-dens.

    Attributes:
        family: short key (``equiformer_v2``, ``escn``, ``esen``).
        label: the architecture's name in messages.
        backbone: dotted path of the DeNS backbone class.
        energy_head: dotted path of the energy head a DeNS config names.
        force_head: dotted path of the direct DeNS force head (forces + noise).
        signature: prefixes of backbone state-dict keys (``backbone.`` removed) that
            only this family's checkpoints hold; all must be present.
        noise_blocks: attribute names of the noise block in this family's DeNS heads
            (ours and fairchem's own DeNS heads); the model check refuses a force head
            without one.
        conservative_head: dotted path of the head giving forces (and stress) as
            energy gradients plus the noise of corrupted atoms, if there is one; the
            class sets :data:`DENS_CONSERVATIVE` (``dens_conservative = True``).
        gradient_force_heads: fairchem registry names of this family's heads whose
            forces are energy gradients; the model check refuses them (no noise path)
            unless they are DeNS-conservative.
        original_prefixes: ``(original, ours)`` renames of the original
            implementation's monolithic checkpoints, if it had this family.
        original_defaults: backbone keywords the original's ``model_attributes`` omit.
    """

    family: str
    label: str
    backbone: str
    energy_head: str
    force_head: str
    signature: tuple[str, ...]
    noise_blocks: tuple[str, ...]
    conservative_head: str | None = None
    gradient_force_heads: tuple[str, ...] = ()
    original_prefixes: tuple[tuple[str, str], ...] = ()
    original_defaults: dict = field(default_factory=dict)

    def matches(self, body_keys: Iterable[str]) -> bool:
        """Whether backbone state-dict keys (without ``backbone.``) are of this family."""
        keys = list(body_keys)
        return all(any(key.startswith(prefix) for key in keys) for prefix in self.signature)

    def use_instead(self) -> str:
        heads = f"{self.energy_head.rsplit('.', 1)[-1]} + {self.force_head.rsplit('.', 1)[-1]}"
        return f"{self.backbone} with {heads} ({self.label})"


@functools.cache
def adapters() -> tuple[BackboneAdapter, ...]:
    """Every registered adapter (imports the backbone modules on first use)."""
    return tuple(importlib.import_module(name).ADAPTER for name in BACKBONE_MODULES)


def adapter(family: str) -> BackboneAdapter:
    """The adapter of ``family``; raises ``ValueError`` naming the known ones."""
    for candidate in adapters():
        if candidate.family == family:
            return candidate
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(a.family for a in adapters())}")


def noise_blocks() -> tuple[str, ...]:
    """Every adapter's noise-block attribute names, each once, in adapter order."""
    return tuple(dict.fromkeys(name for candidate in adapters() for name in candidate.noise_blocks))


def gradient_force_heads() -> tuple[str, ...]:
    """fairchem registry names of the heads whose forces are energy gradients (adapters' and others)."""
    names = (name for candidate in adapters() for name in candidate.gradient_force_heads)
    return tuple(dict.fromkeys((*names, *OTHER_GRADIENT_FORCE_HEADS)))


def is_dens_conservative(head: object) -> bool:
    """Whether a head is a conservative DeNS head (it sets :data:`DENS_CONSERVATIVE`)."""
    return bool(getattr(head, DENS_CONSERVATIVE, False))


def is_hydra(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are a fairchem hydra model's (backbone weights under ``backbone.``)."""
    return any(key.startswith("backbone.") for key in keys)


def backbone_keys(keys: Iterable[str]) -> list[str]:
    """The backbone's state-dict keys: those under ``backbone.`` (prefix removed) of a hydra
    model, every key of a monolithic one (whose heads :func:`family_of_keys` ignores)."""
    keys = list(keys)
    if not is_hydra(keys):
        return keys
    return [key[len("backbone.") :] for key in keys if key.startswith("backbone.")]


def family_of_keys(keys: Iterable[str]) -> BackboneAdapter | None:
    """The adapter whose checkpoints hold these state-dict keys (hydra or monolithic), or None.

    Args:
        keys: state-dict keys without DDP's ``module.`` prefixes (``checkpoints.strip_ddp_prefix``).
    """
    body = backbone_keys(keys)
    return next((candidate for candidate in adapters() if candidate.matches(body)), None)


def known_families() -> str:
    """``EquiformerV2, eSCN, eSEN`` for messages."""
    return ", ".join(candidate.label for candidate in adapters())
