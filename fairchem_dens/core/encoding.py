"""Force encoding: the original forces as spherical-harmonic node features.

DeNS tells the model the forces of the uncorrupted structure so that denoising
a non-equilibrium structure is well posed. Each atom's force ``F`` becomes
``|F| / sqrt(3) * Y_l^m(F / |F|)`` for ``l = 0..lmax`` (e3nn real spherical
harmonics, ``component`` normalisation). With that scaling the ``l = 1``
coefficients equal ``(F_x, F_y, F_z)`` exactly.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3

__all__ = ["force_encoding_coefficients"]


def force_encoding_coefficients(
    forces: torch.Tensor, lmax: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Spherical-harmonic coefficients of per-atom forces.

    Args:
        forces: ``[N, 3]`` raw forces in eV/Å (not normalised: published weights
            were trained on raw forces).
        lmax: highest degree.
        mask: optional ``[N]`` bool; atoms where it is false get zeros.

    Returns:
        ``[N, (lmax + 1) ** 2]`` coefficients, ordered like fairchem's SO3 embeddings.
    """
    irreps = o3.Irreps.spherical_harmonics(lmax=lmax, p=1)
    # normalize=True divides by max(|F|, eps), so a zero force gives zeros after scaling.
    harmonics = o3.spherical_harmonics(irreps, forces, normalize=True, normalization="component")
    coefficients = harmonics * (forces.norm(dim=-1, keepdim=True) / math.sqrt(3.0))
    if mask is not None:
        coefficients = coefficients * mask.view(-1, 1).to(coefficients.dtype)
    return coefficients
