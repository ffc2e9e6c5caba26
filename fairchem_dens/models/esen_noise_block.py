"""``noise_head: block`` for eSEN: a noise head of eSEN's own kind, one message-passing block.

The linear noise head (``denoising_linear``, fairchem's) reads the noise off the final node
features with one ``SO3_Linear``. The block noise head gives the noise its own capacity, as
the GraphAttention noise head of the paper's MD17 model does: a fresh ``eSEN_Block``
(edge-wise SO(2) convolution + atom-wise MLP, the backbone's hyperparameters) on the final
node features, then a one-channel ``SO3_Linear`` read on l = 1, one vector per atom. It runs
on the corrupted atoms' incoming edges only (:mod:`fairchem_dens.core.subgraph`) and never
outside a DeNS batch, so inference and S2EF batches cost what the plain model costs.

The edge inputs are the backbone's own, those its blocks received in this batch (edge
embeddings and Wigner matrices, kept by the DeNS backbone), read on these edges.
"""

from __future__ import annotations

from typing import Any

import torch
from fairchem.core.models.esen.esen import eSEN_Backbone
from fairchem.core.models.esen.esen_block import eSEN_Block
from fairchem.core.models.esen.nn.so3_layers import SO3_Linear
from torch import nn

from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.core.modules import EDGE_INPUTS, l1_vectors
from fairchem_dens.core.subgraph import incoming_subgraph

__all__ = ["eSENNoiseBlock"]


class eSENNoiseBlock(nn.Module):
    """One ``eSEN_Block`` and a one-channel ``SO3_Linear``: the noise of the given atoms.

    Args:
        backbone: the DeNS eSEN backbone, whose sizes the block takes; its per-edge inputs of
            a batch come with each call (``emb[EDGE_INPUTS]``).
    """

    def __init__(self, backbone: eSEN_Backbone) -> None:
        super().__init__()
        self.block = eSEN_Block(
            backbone.sphere_channels,
            backbone.hidden_channels,
            backbone.lmax,
            backbone.mmax,
            backbone.mappingReduced,
            backbone.SO3_grid,
            backbone.edge_channels_list,
            backbone.cutoff,
            backbone.norm_type,
            backbone.act_type,
            backbone.mlp_type,
            backbone.use_envelope,
        )
        self.output = SO3_Linear(backbone.sphere_channels, 1, lmax=1)

    def forward(self, data: Any, emb: dict[str, Any], atoms: torch.Tensor) -> torch.Tensor:
        """``[n, 3]``: the noise prediction of the atoms of the bool mask ``atoms``, in atom order."""
        if emb.get("node_offset", 0) != 0:
            raise DeNSSetupError(
                "noise_head: block does not support graph parallelism (its subgraph needs every "
                "atom's features): use noise_head: linear, or gp_gpus: null."
            )
        inputs = emb.get(EDGE_INPUTS)
        if inputs is None:
            raise RuntimeError("the backbone gave no edge inputs for this batch (is it the DeNS eSEN backbone?)")
        graph = incoming_subgraph(emb["edge_index"], atoms)
        # fairchem runs heads outside autocast (use_amp False): the backbone's reduced-precision
        # inputs of an AMP run are brought to the heads' precision, the node features'
        dtype = emb["node_embedding"].dtype
        x_edge, wigner, wigner_inv = (value[graph.edges].to(dtype) for value in inputs)
        x = self.block(
            emb["node_embedding"][graph.nodes],
            x_edge,
            emb["edge_distance"][graph.edges],
            graph.edge_index,
            wigner,
            wigner_inv,
        )
        return l1_vectors(self.output, x[graph.wanted])
