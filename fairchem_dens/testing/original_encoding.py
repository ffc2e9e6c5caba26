"""The original MD17 DeNS code's force encoding, restated with e3nn for parity tests.

The original (Equiformer's MD17 DeNS model) takes each atom's force as stored in the MD17
files, in kcal/mol/Å; takes its real spherical harmonics up to l = 2 (e3nn, normalised
direction, ``component`` normalisation); zeroes them on atoms that were not corrupted;
multiplies them by ``|F| / sqrt(3)``; and maps them with one e3nn linear layer
(``1x0e+1x1e+1x2e`` to ``C`` channels of each degree, one weight per degree and channel
with fan-in 1, a bias on the scalars) that is added to every atom's node features. Here
that arithmetic runs through e3nn's own ``o3.Linear`` with the weights of one of our
encoding layers copied in, so a test can compare our features with it.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3

__all__ = ["original_force_encoding"]


def original_force_encoding(
    forces: torch.Tensor, corrupted: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """The original's encoding of ``forces`` (its units), in our layout ``[N, (L+1)^2, C]``.

    Args:
        forces: ``[N, 3]`` forces in the unit the original encodes (kcal/mol/Å for MD17).
        corrupted: ``[N]`` bool, the atoms whose force is encoded.
        weight: our layer's weight, ``[L + 1, C, 1]`` (one weight per degree and channel).
        bias: our layer's bias, ``[C]``.
    """
    lmax, channels = weight.shape[0] - 1, weight.shape[1]
    irreps_in = o3.Irreps.spherical_harmonics(lmax=lmax, p=1)
    irreps_out = o3.Irreps([(channels, ir) for _, ir in irreps_in])
    linear = o3.Linear(irreps_in, irreps_out, biases=True)
    with torch.no_grad():  # e3nn lays out one [1, C] weight per (l -> l) path, in order of l
        linear.weight.copy_(weight.reshape(lmax + 1, channels).reshape(-1))
        linear.bias.copy_(bias)
    harmonics = o3.spherical_harmonics(irreps_in, forces, normalize=True, normalization="component")
    harmonics = harmonics * corrupted.view(-1, 1).to(harmonics.dtype)
    harmonics = harmonics * (forces.norm(dim=1, keepdim=True) / math.sqrt(3.0))
    with torch.no_grad():
        out = linear(harmonics)  # [N, C*1 + C*3 + C*5], channel-major within each degree
    blocks = []
    for degree in range(lmax + 1):
        start = channels * degree * degree
        block = out[:, start : start + channels * (2 * degree + 1)].reshape(-1, channels, 2 * degree + 1)
        blocks.append(block.transpose(1, 2))
    return torch.cat(blocks, dim=1)
