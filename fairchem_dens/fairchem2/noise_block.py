"""``noise_head: block`` on fairchem 2: one eSCN-MD message-passing block as the noise head.

The linear noise head (``noise_linear``) reads the noise off the final node features with one
``SO3_Linear``. The block noise head gives the noise its own capacity, as the GraphAttention
noise head of the paper's MD17 model does: a fresh ``eSCNMD_Block`` (edge-wise SO(2)
convolution and atom-wise MLP, the backbone's hyperparameters and execution backend) on the
backbone's final node features, then a one-channel ``SO3_Linear`` read on l = 1, one vector
per atom. It runs on the corrupted atoms' incoming edges only
(:mod:`fairchem_dens.core.subgraph`) and never outside a DeNS batch, so inference costs what
the plain model costs, and the plain inference checkpoint drops it (``noise_block.``).

The edge inputs are the backbone's own, those its blocks received in this batch (edges, edge
embeddings, Wigner matrices with the envelope, kept by the DeNS backbone), read on these edges.
"""

from __future__ import annotations

import torch
from fairchem.core.models.uma.escn_md import eSCNMDBackbone
from fairchem.core.models.uma.escn_md_block import eSCNMD_Block
from fairchem.core.models.uma.nn.execution_backends import ExecutionBackend
from fairchem.core.models.uma.nn.so3_layers import SO3_Linear
from torch import nn

from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.core.modules import l1_vectors
from fairchem_dens.core.subgraph import incoming_subgraph

__all__ = ["eSCNMDNoiseBlock"]


class eSCNMDNoiseBlock(nn.Module):
    """One ``eSCNMD_Block`` and a one-channel ``SO3_Linear``: the noise of the given atoms.

    Args:
        backbone: the DeNS eSCN-MD (or UMA) backbone, whose sizes and execution backend the
            block takes; its per-edge inputs of a batch come with each call.
    """

    def __init__(self, backbone: eSCNMDBackbone) -> None:
        super().__init__()
        # Fast backends precompute every block's radial functions inside the backbone's forward;
        # only the general backend lets a block outside it compute its own.
        if type(backbone.backend).get_layer_radial_emb is not ExecutionBackend.get_layer_radial_emb:
            raise DeNSSetupError(
                f"noise_head: block needs eSCN-MD's general execution backend, this backbone uses "
                f"{type(backbone.backend).__name__}: set the backbone's execution_mode to general for "
                "training, or use noise_head: linear."
            )
        self.block = eSCNMD_Block(
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
            backbone.ff_type,
            activation_checkpoint_chunk_size=None,
            backend=backbone.backend,
        )
        self.output = SO3_Linear(backbone.sphere_channels, 1, lmax=1)

    def forward(
        self, node_embedding: torch.Tensor, edge_inputs: tuple[torch.Tensor, ...], atoms: torch.Tensor
    ) -> torch.Tensor:
        """``[n, 3]``: the noise prediction of the atoms of the bool mask ``atoms``, in atom order.

        ``edge_inputs``: the backbone's ``emb[EDGE_INPUTS]`` of this batch.
        """
        edge_index, *per_edge = edge_inputs
        sub = incoming_subgraph(edge_index, atoms)
        # fairchem runs heads outside autocast (use_amp False): the backbone's bf16 Wigner matrices
        # of an AMP run are brought to the heads' precision, the node features'
        x_edge, wigner, wigner_inv_envelope = (value[sub.edges].to(node_embedding.dtype) for value in per_edge)
        x = self.block(
            node_embedding[sub.nodes],
            x_edge,
            sub.edge_index,
            wigner,
            wigner_inv_envelope,
            total_atoms_across_gp_ranks=int(sub.nodes.sum()),
            scatter_target=sub.edge_index[1],
        )
        return l1_vectors(self.output, x[sub.wanted])
