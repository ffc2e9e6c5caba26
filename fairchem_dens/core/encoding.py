"""Force encoding: the original forces as spherical-harmonic node features.

DeNS tells the model the forces of the uncorrupted structure so that denoising
a non-equilibrium structure is well posed. Each atom's force ``F`` becomes
``|F| / sqrt(3) * Y_l^m(F / |F|)`` for ``l = 0..lmax`` (e3nn real spherical
harmonics, ``component`` normalisation). With that scaling the ``l = 1``
coefficients equal ``(F_x, F_y, F_z)`` exactly, so the encoding is linear in the
force's units: ``force_encoding_scale`` (a backbone keyword, 1 by default) multiplies
the forces first. The original MD17 code encodes forces in kcal/mol/Å, the MD17 files'
unit; our data holds eV/Å, so the MD17 recipes set :data:`KCAL_PER_MOL_PER_EV` to
encode the same numbers (docs/algorithm.md#force-encoding).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
from e3nn import o3

from fairchem_dens.core.errors import DeNSSetupError

__all__ = [
    "KCAL_PER_MOL_PER_EV",
    "check_force_encoding_scale",
    "fold_force_encoding_bias",
    "force_encoding_coefficients",
]

#: 1 eV in kcal/mol (ASE's CODATA 2014 units: the factor `md17-to-lmdb` divides MD17's labels by).
KCAL_PER_MOL_PER_EV = 23.060548012069496


def check_force_encoding_scale(scale: object) -> float:
    """Refuses a ``force_encoding_scale`` that is not a positive finite number, naming the key."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise DeNSSetupError(
            f"force_encoding_scale (a key of the model's DeNS backbone) must be a positive number that "
            f"multiplies the forces given to the encoding (1: eV/Å as stored; {KCAL_PER_MOL_PER_EV:.4f}: "
            f"kcal/mol/Å, the original MD17 code's), got {scale!r}"
        )
    return float(scale)


def force_encoding_coefficients(
    forces: torch.Tensor, lmax: int, mask: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    """Spherical-harmonic coefficients of per-atom forces.

    Args:
        forces: ``[N, 3]`` raw forces in eV/Å (not normalised: published weights
            were trained on raw forces).
        lmax: highest degree.
        mask: optional ``[N]`` bool; atoms where it is false get zeros.
        scale: multiplies the forces first (the unit they are encoded in).

    Returns:
        ``[N, (lmax + 1) ** 2]`` coefficients, ordered like fairchem's SO3 embeddings.
    """
    if scale != 1.0:
        forces = forces * scale
    harmonics = _harmonics(lmax)(forces)
    coefficients = harmonics * (forces.norm(dim=-1, keepdim=True) / math.sqrt(3.0))
    if mask is not None:
        coefficients = coefficients * mask.view(-1, 1).to(coefficients.dtype)
    return coefficients


@functools.lru_cache(maxsize=None)
def _harmonics(lmax: int) -> o3.SphericalHarmonics:
    """e3nn's real spherical harmonics up to ``lmax``, built once: ``o3.spherical_harmonics``
    builds and compiles the same module on every call (a few ms, most of the encoding's cost).

    normalize=True divides by max(|F|, eps), so a zero force gives zeros after scaling.
    """
    irreps = o3.Irreps.spherical_harmonics(lmax=lmax, p=1)
    return o3.SphericalHarmonics(irreps, normalize=True, normalization="component")


def fold_force_encoding_bias(state_dict: dict[str, torch.Tensor], prefix: str = "backbone.") -> OrderedDict:
    """A state dict without ``{prefix}force_embedding``, its bias moved into the atom embedding.

    Outside DeNS batches the force-encoding layer adds only its bias, to the l = 0 node
    features of every atom, which is where every backbone's ``sphere_embedding`` goes
    (fairchem 1's EquiformerV2, eSCN and eSEN, fairchem 2's eSCN-MD): adding the bias to
    every row of ``sphere_embedding`` gives the plain backbone the same outputs.
    """
    bias = state_dict[f"{prefix}force_embedding.bias"]
    if f"{prefix}sphere_embedding.weight" not in state_dict:  # the bias would be lost, not folded
        raise KeyError(f"no {prefix}sphere_embedding.weight to fold {prefix}force_embedding.bias into")
    folded = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith(f"{prefix}force_embedding."):
            continue
        if key == f"{prefix}sphere_embedding.weight":
            value = value + bias.to(value.dtype).view(1, -1)
        folded[key] = value
    return folded
