"""Plumbing every DeNS model shares, whatever its framework (torch only).

* :class:`BatchDuringForward`: the DeNS features enter through a hook on a submodule of a
  backbone's unchanged ``forward``; the hook reads the batch from ``self._dens_data``,
  which this mixin's ``forward`` sets for the duration of the call, and may hand tensors
  to the heads through ``self._dens_outputs``, which it adds to the backbone's output.
* :func:`zero_weight`: DDP runs without a search for unused parameters, so a block that
  did not run in a batch still puts its parameters in the autograd graph, with weight 0.
* :func:`l1_vectors`: the vector (l = 1) read-out of force and noise heads.
* :func:`check_noise_head`: the ``noise_head`` keyword of the DeNS heads, ``linear`` (one
  linear read-out, the default) or ``block`` (a message-passing block of the backbone's kind).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "DENS_BACKBONE_KEYWORDS",
    "EDGE_INPUTS",
    "NOISE_HEADS",
    "BatchDuringForward",
    "check_noise_head",
    "l1_vectors",
    "zero_weight",
]

#: Keywords of our DeNS backbones that fairchem's plain backbones do not take (dropped when a
#: checkpoint is turned into a plain fairchem one).
DENS_BACKBONE_KEYWORDS = ("use_force_encoding", "force_encoding_scale", "use_noise_schedule_sigma_encoding")

#: The key of a DeNS backbone's output holding the per-edge inputs its blocks received in a
#: DeNS batch, for a block noise head (put there by a hook through ``_dens_outputs``).
EDGE_INPUTS = "dens_edge_inputs"


class BatchDuringForward:
    """Keeps the batch at hand for hooks during ``forward`` (put it before the backbone class).

    Hooks put what the heads need in ``self._dens_outputs`` (name -> value); the forward adds
    it to the backbone's output dict and keeps nothing, so no tensor of a batch stays on the
    module (a deep copy, an EMA copy, stays possible at any time).
    """

    _dens_data = None
    _dens_outputs: dict = {}

    def forward(self, data):
        self._dens_data, self._dens_outputs = data, {}
        try:
            return {**super().forward(data), **self._dens_outputs}
        finally:
            self._dens_data, self._dens_outputs = None, {}


def zero_weight(module: nn.Module) -> torch.Tensor:
    """0 times one entry of every parameter: puts them in the autograd graph at no cost."""
    return 0.0 * sum(p.view(-1)[0] for p in module.parameters() if p.requires_grad)


def l1_vectors(layer: Callable[[torch.Tensor], torch.Tensor], node_embedding: torch.Tensor) -> torch.Tensor:
    """``[n, 3]``: the l = 1 output of a one-channel SO(3) linear layer on the l <= 1 node features.

    ``node_embedding`` is ``[n, (lmax + 1)^2, channels]`` in e3nn's order (l = 0, then the
    three l = 1 coefficients), as eSEN and eSCN-MD keep it.
    """
    return layer(node_embedding.narrow(1, 0, 4)).narrow(1, 1, 3).reshape(-1, 3)


#: The values of a DeNS head's ``noise_head`` keyword.
NOISE_HEADS = ("linear", "block")


def check_noise_head(noise_head: Any) -> str:
    """Refuses a ``noise_head`` other than ``linear`` or ``block``, naming the key."""
    from fairchem_dens.core.errors import DeNSSetupError

    if noise_head not in NOISE_HEADS:
        raise DeNSSetupError(
            f"noise_head (a key of the model's DeNS head) must be 'linear' (one linear read-out, the "
            f"default) or 'block' (a message-passing block of the backbone's kind), got {noise_head!r}"
        )
    return noise_head
