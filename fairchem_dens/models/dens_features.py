"""The DeNS node features and force output shared by the backbone adapters.

``force_embedding`` (fairchem's ``SO3_LinearV2``, 1 -> C channels, lmax L) maps the
force encoding of :mod:`fairchem_dens.core.encoding` to node features. It runs in every
mode: with a zero input it still adds its bias to the l = 0 coefficient, and the
published weights were trained with that bias, so it must stay.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from fairchem.core.models.equiformer_v2.so3 import SO3_Embedding, SO3_LinearV2
from torch import nn

from fairchem_dens.core.batch import corrupted_atoms, is_dens_batch
from fairchem_dens.core.encoding import (
    check_force_encoding_scale,
    fold_force_encoding_bias,
    force_encoding_coefficients,
)
from fairchem_dens.core.modules import BatchDuringForward, zero_weight

__all__ = [
    "is_dens_batch",
    "make_force_embedding",
    "dens_node_features",
    "dens_force_output",
    "edge_subset_rotations",
    "DeNSBackboneMixin",
    "fold_force_encoding_bias",
]


class DeNSBackboneMixin(BatchDuringForward):
    """What every DeNS backbone adds to a fairchem backbone class (put it first in the bases).

    The DeNS features are added by a hook on a submodule of the unchanged base
    ``forward``; the hook reads the batch from ``self._dens_data``
    (:class:`fairchem_dens.core.modules.BatchDuringForward`).
    """

    def _set_force_encoding(self, use_force_encoding: bool, force_encoding_scale: float) -> None:
        """Stores the encoding keywords every DeNS backbone takes (the scale checked)."""
        self.use_force_encoding = use_force_encoding
        self.force_encoding_scale = check_force_encoding_scale(force_encoding_scale)

    def _require_single_resolution(self) -> None:
        if self.num_resolutions != 1:
            raise ValueError(
                "DeNS force encoding supports one resolution (a single entry in "
                f"lmax_list), got lmax_list={self.lmax_list}"
            )


def make_force_embedding(channels: int, lmax: int) -> SO3_LinearV2:
    """The force-encoding layer (state-dict names ``weight``, ``bias``, ``expand_index``)."""
    return SO3_LinearV2(in_features=1, out_features=channels, lmax=lmax)


def dens_node_features(
    data: Any,
    force_embedding: SO3_LinearV2,
    lmax: int,
    *,
    use_force_encoding: bool = True,
    force_encoding_scale: float = 1.0,
    sigma_embedding: nn.Linear | None = None,
    nodes: slice = slice(None),
) -> torch.Tensor:
    """The DeNS contribution to the node embeddings, ``[n, (L+1)^2, C]``.

    Args:
        data: the batch; a DeNS batch carries raw ``forces`` and optionally
            ``noise_mask`` and ``sigmas``.
        force_embedding: the force-encoding layer (fairchem's ``SO3_LinearV2``, or eSEN's ``SO3_Linear``).
        lmax: highest degree of the node embeddings.
        use_force_encoding: false zeroes the encoding input (ablation).
        force_encoding_scale: multiplies the forces before they are encoded (their unit).
        sigma_embedding: optional ``Linear(1, C)`` encoding each atom's sigma on l = 0.
        nodes: the nodes this rank holds (graph parallelism).
    """
    dtype = data.pos.dtype
    if is_dens_batch(data) and use_force_encoding:
        mask = getattr(data, "noise_mask", None)
        coefficients = force_encoding_coefficients(
            data.forces[nodes].to(dtype), lmax, None if mask is None else mask[nodes], force_encoding_scale
        )
    else:
        coefficients = data.pos.new_zeros((data.pos[nodes].shape[0], (lmax + 1) ** 2))
    features = _embed(force_embedding, coefficients.unsqueeze(-1), lmax)
    if sigma_embedding is None:
        return features
    if is_dens_batch(data):
        if not hasattr(data, "sigmas"):
            raise ValueError(
                "use_noise_schedule_sigma_encoding needs per-atom `sigmas` on the batch: "
                "use multi-scale noise (fixed_noise_std: false)."
            )
        sigmas = data.sigmas[nodes].to(dtype).view(-1, 1)
    else:
        sigmas = data.pos.new_zeros((features.shape[0], 1))
    sigma_features = sigma_embedding(sigmas).unsqueeze(1)
    return torch.cat([features[:, :1, :] + sigma_features, features[:, 1:, :]], dim=1)


def _embed(force_embedding: nn.Module, coefficients: torch.Tensor, lmax: int) -> torch.Tensor:
    """``[n, (L+1)^2, 1] -> [n, (L+1)^2, C]`` through the backbone's SO(3) linear layer."""
    if not isinstance(force_embedding, SO3_LinearV2):
        return force_embedding(coefficients)  # eSEN's SO3_Linear works on plain tensors
    encoding = SO3_Embedding(0, [lmax], 1, coefficients.device, coefficients.dtype)
    encoding.set_embedding(coefficients)
    encoding.set_lmax_mmax([lmax], [lmax])
    return force_embedding(encoding).embedding


def dens_force_output(
    data: Any,
    run_force_block: Callable[[torch.Tensor | None], torch.Tensor],
    run_noise_block: Callable[[torch.Tensor | None], torch.Tensor],
    force_block: nn.Module,
    noise_block: nn.Module,
    training: bool,
) -> torch.Tensor:
    """The single ``forces`` output of a DeNS force head (docs/algorithm.md#noise-head-and-the-forces-output).

    Noise predictions on corrupted atoms (all atoms without a ``noise_mask``),
    force predictions elsewhere. Each block computes only the atoms whose output is
    used: an S2EF batch runs the force block alone, a fully corrupted batch the
    noise block alone, and a partially corrupted batch runs the noise block on the
    corrupted atoms and the force block on the others, so a DeNS batch costs what
    an S2EF batch costs. A block that has no atom in a batch still enters the graph
    in training with weight 0, so every parameter gets a (zero) gradient and DDP
    needs no ``find_unused_parameters``; the peers get that by running both blocks
    on every atom and multiplying one output by 0.

    Args:
        data: the batch.
        run_force_block: ``atoms -> [N, 3]``, the force block's output, correct on the
            rows of the bool mask ``atoms`` (``None``: every atom).
        run_noise_block: the same for the noise block.
        force_block: the force block (for the zero-weight term).
        noise_block: the noise block (for the zero-weight term).
        training: whether the head is in training mode.
    """
    corrupted = corrupted_atoms(data)  # none in an S2EF batch, all without a noise_mask
    if not bool(corrupted.any()):
        output, unused = run_force_block(None), noise_block
    elif bool(corrupted.all()):
        output, unused = run_noise_block(None), force_block
    else:
        return torch.where(corrupted.view(-1, 1), run_noise_block(corrupted), run_force_block(~corrupted))
    if training:
        output = output + zero_weight(unused)
    return output


@contextlib.contextmanager
def edge_subset_rotations(rotations: nn.ModuleList, edges: torch.Tensor | None) -> Iterator[None]:
    """Lets an EquiformerV2 block run on a subset of the edges.

    The blocks read each edge's Wigner matrices from the backbone's shared
    ``SO3_Rotation`` modules, which hold them for every edge; for the duration of
    the block they hold those of ``edges`` only (bool ``[E]``, ``None``: all). The
    matrices carry no gradient, and autograd keeps the sliced ones it used.
    """
    if edges is None:
        yield
        return
    saved = [(rotation.wigner, rotation.wigner_inv) for rotation in rotations]
    try:
        for rotation, (wigner, wigner_inv) in zip(rotations, saved):
            rotation.wigner, rotation.wigner_inv = wigner[edges], wigner_inv[edges]
        yield
    finally:
        for rotation, (wigner, wigner_inv) in zip(rotations, saved):
            rotation.wigner, rotation.wigner_inv = wigner, wigner_inv
