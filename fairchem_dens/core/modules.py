"""Plumbing every DeNS model shares, whatever its framework (torch only).

* :class:`BatchDuringForward`: the DeNS features enter through a hook on a submodule of a
  backbone's unchanged ``forward``; the hook reads the batch from ``self._dens_data``,
  which this mixin's ``forward`` sets for the duration of the call.
* :func:`zero_weight`: DDP runs without a search for unused parameters, so a block that
  did not run in a batch still puts its parameters in the autograd graph, with weight 0.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BatchDuringForward", "zero_weight"]


class BatchDuringForward:
    """Keeps the batch at hand for hooks during ``forward`` (put it before the backbone class)."""

    _dens_data = None

    def forward(self, data):
        self._dens_data = data
        try:
            return super().forward(data)
        finally:
            self._dens_data = None


def zero_weight(module: nn.Module) -> torch.Tensor:
    """0 times one entry of every parameter: puts them in the autograd graph at no cost."""
    return 0.0 * sum(p.view(-1)[0] for p in module.parameters() if p.requires_grad)
