"""EquiformerV2 with DeNS: a backbone with force encoding and a noise head.

Built on fairchem 1.10's EquiformerV2 modules. Parameter names equal those of
fairchem's own port (``backbone.force_embedding``,
``backbone.noise_schedule_sigma_embedding``, ``output_heads.<e>.scalar_block``,
``output_heads.<f>.vector_block``, ``output_heads.<f>.denoising_pos_block``), so
state dicts move between the two unchanged.

Use them through fairchem's ``hydra`` model::

    model:
      name: hydra
      pass_through_head_outputs: True
      backbone: {model: fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone, ...}
      heads:
        energy: {module: fairchem_dens.models.equiformer_v2.DeNSEquiformerV2EnergyHead}
        forces: {module: fairchem_dens.models.equiformer_v2.DeNSEquiformerV2ForceHead}

``DeNSEnergyHead`` and ``DeNSForceHead``, the names of the first releases, stay as aliases.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from fairchem.core.common import gp_utils
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
from fairchem.core.models.equiformer_v2.equiformer_v2_dens import DeNSScalarHead
from fairchem.core.models.equiformer_v2.transformer_block import SO2EquivariantGraphAttention
from fairchem.core.models.equiformer_v2.weight_initialization import eqv2_init_weights
from torch import nn

from fairchem_dens.core.roles import FORCES
from fairchem_dens.models.adapters import BackboneAdapter
from fairchem_dens.models.dens_features import (
    DeNSBackboneMixin,
    dens_force_output,
    dens_node_features,
    edge_subset_rotations,
    is_dens_batch,
    make_force_embedding,
)

if TYPE_CHECKING:
    from torch_geometric.data import Batch

__all__ = [
    "ADAPTER",
    "DeNSEquiformerV2Backbone",
    "DeNSEquiformerV2EnergyHead",
    "DeNSEquiformerV2ForceHead",
    "DeNSEnergyHead",
    "DeNSForceHead",
    "is_dens_batch",
]


@registry.register_model("fairchem_dens_eqv2_backbone")
class DeNSEquiformerV2Backbone(DeNSBackboneMixin, EquiformerV2Backbone):
    """fairchem's EquiformerV2 backbone plus DeNS force (and sigma) encoding.

    The encoding is added to the node embeddings after the atomic-number
    embedding and before the transformer blocks (docs/algorithm.md#force-encoding). It is added through a
    forward hook on ``edge_degree_embedding``, whose output the base class adds
    to the node embeddings at exactly that point, so the base ``forward`` runs
    unchanged.

    Args:
        use_force_encoding: encode the original forces of corrupted atoms. With
            false the encoding input is always zero (ablation); the layer's bias
            is still added so the weights stay interchangeable.
        force_encoding_scale: multiplies the forces before they are encoded: 1 encodes eV/Å as
            stored, 23.06 kcal/mol/Å as the original MD17 code (docs/algorithm.md#force-encoding).
        use_noise_schedule_sigma_encoding: also encode each atom's sigma (only
            meaningful with multi-scale noise).
        **kwargs: every keyword of fairchem's ``EquiformerV2Backbone``.
    """

    def __init__(
        self,
        *,
        use_force_encoding: bool = True,
        force_encoding_scale: float = 1.0,
        use_noise_schedule_sigma_encoding: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._require_single_resolution()
        self._set_force_encoding(use_force_encoding, force_encoding_scale)
        self.use_noise_schedule_sigma_encoding = use_noise_schedule_sigma_encoding
        self.force_embedding = make_force_embedding(self.sphere_channels, max(self.lmax_list))
        if use_noise_schedule_sigma_encoding:
            self.noise_schedule_sigma_embedding = nn.Linear(1, self.sphere_channels)
        self.apply(partial(eqv2_init_weights, weight_init=self.weight_init))
        self.edge_degree_embedding.register_forward_hook(self._add_dens_encoding, with_kwargs=True)

    def _add_dens_encoding(self, module, args, kwargs, edge_degree):
        data = self._dens_data
        if data is None:  # called outside our forward (e.g. by a user); nothing to add
            return edge_degree
        num_nodes = args[3] if len(args) > 3 else kwargs["num_nodes"]
        node_offset = args[4] if len(args) > 4 else kwargs.get("node_offset", 0)
        nodes = slice(node_offset, node_offset + num_nodes)
        edge_degree.embedding = edge_degree.embedding + self.dens_node_features(data, nodes)
        return edge_degree

    def dens_node_features(self, data: Batch, nodes: slice = slice(None)) -> torch.Tensor:
        """The DeNS contribution to the node embeddings of ``nodes``, ``[n, (L+1)^2, C]``."""
        return dens_node_features(
            data,
            self.force_embedding,
            max(self.lmax_list),
            use_force_encoding=self.use_force_encoding,
            force_encoding_scale=self.force_encoding_scale,
            sigma_embedding=getattr(self, "noise_schedule_sigma_embedding", None),
            nodes=nodes,
        )


def _attention_block(backbone: EquiformerV2Backbone) -> SO2EquivariantGraphAttention:
    """An SO(2) attention block with one output channel, as fairchem's force head uses."""
    return SO2EquivariantGraphAttention(
        backbone.sphere_channels,
        backbone.attn_hidden_channels,
        backbone.num_heads,
        backbone.attn_alpha_channels,
        backbone.attn_value_channels,
        1,
        backbone.lmax_list,
        backbone.mmax_list,
        backbone.SO3_rotation,
        backbone.mappingReduced,
        backbone.SO3_grid,
        backbone.max_num_elements,
        backbone.edge_channels_list,
        backbone.block_use_atom_edge_embedding,
        backbone.use_m_share_rad,
        backbone.attn_activation,
        backbone.use_s2_act_attn,
        backbone.use_attn_renorm,
        backbone.use_gate_act,
        backbone.use_sep_s2_act,
        alpha_drop=0.0,
    )


#: Energy of the original (uncorrupted) structure: fairchem's own ``DeNSScalarHead`` (``scalar_block``;
#: ``use_denoising=False`` zeroes the energy of DeNS batches, the paper's ablation), used as it is.
DeNSEquiformerV2EnergyHead = registry.register_model("fairchem_dens_eqv2_energy_head")(DeNSScalarHead)


@registry.register_model("fairchem_dens_eqv2_force_head")
class DeNSEquiformerV2ForceHead(nn.Module, HeadInterface):
    """Forces of uncorrupted atoms and normalised noise of corrupted ones.

    ``vector_block`` predicts forces, ``denoising_pos_block`` (same architecture)
    predicts ``noise / sigma_N``. In a DeNS batch the output is the noise
    prediction on corrupted atoms (all atoms if the batch has no
    ``noise_mask``) and the force prediction elsewhere. A block whose output is
    not used is not run (see :func:`~fairchem_dens.models.dens_features.dens_force_output`):
    S2EF batches, validation, prediction, relaxations and the ASE calculator never
    run the noise block, fully corrupted batches never run the force block, and in a
    partially corrupted batch each block runs only on the edges into its atoms.

    Args:
        backbone: the DeNS EquiformerV2 backbone.
        output_name: name of the output.
    """

    def __init__(self, backbone: EquiformerV2Backbone, output_name: str = FORCES) -> None:
        super().__init__()
        self.output_name = output_name
        self.activation_checkpoint = backbone.activation_checkpoint
        self.vector_block = _attention_block(backbone)
        self.denoising_pos_block = _attention_block(backbone)
        self.apply(partial(eqv2_init_weights, weight_init=backbone.weight_init))

    def _vectors(self, block: nn.Module, emb: dict[str, Any], atoms: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, 3]`` output of ``block``; with ``atoms``, computed only on the edges into those atoms.

        An SO(2) attention block aggregates messages at their target atoms (its
        attention softmax runs over each target's incoming edges), so the edges into
        ``atoms`` give exactly the full block's output there; other rows are not used.
        """
        graph = emb["graph"]
        edge_index, edge_distance = graph.edge_index, graph.edge_distance
        # Checkpointed blocks recompute in backward, after the rotations are restored: run them whole.
        restrict = atoms is not None and not self.activation_checkpoint and not gp_utils.initialized()
        edges = atoms[edge_index[1] - graph.node_offset] if restrict else None
        inputs = (
            emb["node_embedding"],
            graph.atomic_numbers_full,
            edge_distance if edges is None else edge_distance[edges],
            edge_index if edges is None else edge_index[:, edges],
            graph.node_offset,
        )
        if self.activation_checkpoint:
            out = torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=not self.training)
        else:
            with edge_subset_rotations(block.SO3_rotation, edges):
                out = block(*inputs)
        vectors = out.embedding.narrow(1, 1, 3).reshape(-1, 3)
        if gp_utils.initialized():
            vectors = gp_utils.gather_from_model_parallel_region(vectors, dim=0)
        return vectors

    def forward(self, data: Batch, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        forces = dens_force_output(
            data,
            lambda atoms: self._vectors(self.vector_block, emb, atoms),
            lambda atoms: self._vectors(self.denoising_pos_block, emb, atoms),
            self.vector_block,
            self.denoising_pos_block,
            self.training,
        )
        return {self.output_name: forces}


# The names of the first releases (configs and pickled references use them).
DeNSEnergyHead = DeNSEquiformerV2EnergyHead
DeNSForceHead = DeNSEquiformerV2ForceHead

ADAPTER = BackboneAdapter(
    family="equiformer_v2",
    label="EquiformerV2",
    backbone=f"{__name__}.DeNSEquiformerV2Backbone",
    energy_head=f"{__name__}.DeNSEquiformerV2EnergyHead",
    force_head=f"{__name__}.DeNSEquiformerV2ForceHead",
    signature=("blocks.0.ga.",),
    noise_blocks=("denoising_pos_block",),
    original_prefixes=(
        ("force_block.", "output_heads.forces.vector_block."),
        ("energy_block.", "output_heads.energy.scalar_block."),
        ("denoising_pos_block.", "output_heads.forces.denoising_pos_block."),
    ),
    # the original EquiformerV2 class defaults, absent from the published model_attributes
    original_defaults={"avg_num_nodes": 77.81317, "avg_degree": 23.395238876342773},
)
