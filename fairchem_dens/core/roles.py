"""The outputs DeNS treats specially, and what a DeNS batch does with each output of a config.

One table that models, losses and metrics of every integration read.

In a DeNS batch some structures are corrupted. Each output is then one of:

* ``original``: the model predicts the value of the *original* structure and is
  trained on the clean label (``energy``, as in the paper);
* ``replaced``: on corrupted atoms the output holds the noise prediction and is
  trained on the noise; clean atoms keep their label (``forces``);
* ``excluded``: the corruption changes the value, so corrupted structures are
  left out of the term and its metrics; clean structures of the same batch are
  trained as usual (``stress`` and its ``decompose_tensor`` parts, any other
  system- or atom-level property).

Defaults: ``energy`` original, ``forces`` replaced, everything else excluded.
``optim.denoising_pos_params.output_policy`` overrides an entry per output.
"""

from __future__ import annotations

from typing import Any, Mapping

from fairchem_dens.core.errors import DeNSConfigError

__all__ = [
    "ENERGY",
    "FORCES",
    "STRESS",
    "GRADIENT_OUTPUTS",
    "ORIGINAL",
    "REPLACED",
    "EXCLUDED",
    "ROLES",
    "output_roles",
]

ENERGY = "energy"
#: The output that holds the noise prediction on corrupted atoms.
FORCES = "forces"
STRESS = "stress"
#: Outputs a conservative head derives from the energy: -dE/dx and virial / volume.
GRADIENT_OUTPUTS = (FORCES, STRESS)

ORIGINAL = "original"
REPLACED = "replaced"
EXCLUDED = "excluded"
ROLES = (ORIGINAL, REPLACED, EXCLUDED)

DEFAULT_ROLES = {ENERGY: ORIGINAL, FORCES: REPLACED}
KEY = "optim.denoising_pos_params.output_policy"


def output_roles(
    output_targets: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, str] | None
) -> dict[str, str]:
    """The DeNS role of every output of a config.

    Args:
        output_targets: fairchem's ``output_targets`` (``outputs`` with the
            ``decomposition`` parts flattened in).
        overrides: ``output_policy`` from the DeNS settings, or ``None``.

    Returns:
        ``{output name: role}`` for every output.

    Raises:
        DeNSConfigError: an output DeNS needs is missing, or an override names an
            unknown output, an unknown role, or a role the output cannot take.
    """
    missing = [name for name in (ENERGY, FORCES) if name not in output_targets]
    if missing:
        raise DeNSConfigError(
            f"the config has no `{'` / `'.join(missing)}` output: DeNS predicts the energy of "
            "the original structure and the noise through the `forces` output, so `outputs` "
            "needs `energy: {level: system}` and `forces: {level: atom}` (and their "
            "loss_functions entries)."
        )
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(output_targets))
    if unknown:
        raise DeNSConfigError(
            f"{KEY} names {', '.join(unknown)}, which the config's `outputs` does not have; "
            f"outputs: {', '.join(output_targets)}"
        )
    roles = {}
    for name in output_targets:
        role = overrides.get(name, DEFAULT_ROLES.get(name, EXCLUDED))
        if role not in ROLES:
            raise DeNSConfigError(f"{KEY}.{name} must be one of {', '.join(ROLES)}, got {role!r}")
        if (name == FORCES) != (role == REPLACED):
            raise DeNSConfigError(
                f"{KEY}.{name}: only `forces` is replaced by the noise target (the DeNS force "
                f"head writes its noise prediction there) and `forces` is always replaced; got {role!r}"
            )
        roles[name] = role
    if output_targets[FORCES].get("level", "atom") != "atom":
        raise DeNSConfigError("outputs.forces.level must be `atom`: DeNS predicts per-atom noise there")
    return roles
