"""eSCN with DeNS: fairchem's eSCN backbone plus force encoding and a noise head.

fairchem 1.10 has no eSCN with DeNS; the original implementation does
(``escn_dens``). Use the classes through fairchem's ``hydra`` model with
fairchem's own energy head::

    model:
      name: hydra
      pass_through_head_outputs: True
      backbone: {model: fairchem_dens.models.escn.DeNSeSCNBackbone, ...}
      heads:
        energy: {module: fairchem.core.models.escn.escn.eSCNEnergyHead}
        forces: {module: fairchem_dens.models.escn.DeNSeSCNForceHead}

State-dict names: ``backbone.force_embedding.*``, ``output_heads.energy.energy_block.*``,
``output_heads.forces.force_block.*`` and ``output_heads.forces.denoising_pos_block.*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface
from fairchem.core.models.escn.escn import ForceBlock, eSCNBackbone
from torch import nn

from fairchem_dens.core.roles import FORCES
from fairchem_dens.models.adapters import BackboneAdapter
from fairchem_dens.models.dens_features import (
    DeNSBackboneMixin,
    dens_force_output,
    dens_node_features,
    make_force_embedding,
)

if TYPE_CHECKING:
    from torch_geometric.data import Batch

__all__ = ["ADAPTER", "DeNSeSCNBackbone", "DeNSeSCNForceHead"]


@registry.register_model("fairchem_dens_escn_backbone")
class DeNSeSCNBackbone(DeNSBackboneMixin, eSCNBackbone):
    """fairchem's eSCN backbone plus DeNS force encoding.

    The encoding of a DeNS batch is added to the node embeddings right before the
    first message-passing layer, through a forward pre-hook on ``layer_blocks[0]``
    so the base ``forward`` runs unchanged. As in the original ``escn_dens`` (its
    reference outputs confirm it), the layer runs in every mode: S2EF batches and
    inference get its bias added to the l = 0 coefficients.

    Args:
        use_force_encoding: encode the original forces of corrupted atoms.
        force_encoding_scale: multiplies the forces before they are encoded: 1 encodes eV/Å as
            stored, 23.06 kcal/mol/Å as the original MD17 code (docs/algorithm.md#force-encoding).
        **kwargs: every keyword of fairchem's ``eSCNBackbone``.
    """

    def __init__(self, *, use_force_encoding: bool = True, force_encoding_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._require_single_resolution()
        self._set_force_encoding(use_force_encoding, force_encoding_scale)
        self.force_embedding = make_force_embedding(self.sphere_channels, max(self.lmax_list))
        # The original's initialisation: small weights so early training is not swamped.
        nn.init.uniform_(self.force_embedding.weight, -0.001, 0.001)
        nn.init.zeros_(self.force_embedding.bias)
        self.layer_blocks[0].register_forward_pre_hook(self._add_dens_encoding)

    def _add_dens_encoding(self, module, args):
        data = self._dens_data
        if data is None:
            return None
        x = args[0]
        features = dens_node_features(
            data,
            self.force_embedding,
            max(self.lmax_list),
            use_force_encoding=self.use_force_encoding,
            force_encoding_scale=self.force_encoding_scale,
        )
        x.embedding = x.embedding + features.to(x.embedding.dtype)
        return None


@registry.register_model("fairchem_dens_escn_force_head")
class DeNSeSCNForceHead(nn.Module, HeadInterface):
    """Forces of uncorrupted atoms and normalised noise of corrupted ones (eSCN).

    ``force_block`` and ``denoising_pos_block`` are two fairchem ``ForceBlock``
    s on the sphere-sampled node features. Outputs are combined as in
    :class:`fairchem_dens.models.equiformer_v2.DeNSForceHead`: only the blocks
    whose output is used run.

    Args:
        backbone: the DeNS eSCN backbone.
        output_name: name of the output.
    """

    def __init__(self, backbone: eSCNBackbone, output_name: str = FORCES) -> None:
        super().__init__()
        backbone.force_block = None  # the backbone's own block is unused in hydra mode
        self.output_name = output_name
        self.force_block = ForceBlock(backbone.sphere_channels_all, backbone.num_sphere_samples, backbone.act)
        self.denoising_pos_block = ForceBlock(backbone.sphere_channels_all, backbone.num_sphere_samples, backbone.act)

    def forward(self, data: Batch, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        values, points = emb["sphere_values"], emb["sphere_points"]
        forces = dens_force_output(
            data,
            lambda atoms: _on_atoms(self.force_block, values, points, atoms),
            lambda atoms: _on_atoms(self.denoising_pos_block, values, points, atoms),
            self.force_block,
            self.denoising_pos_block,
            self.training,
        )
        return {self.output_name: forces}


def _on_atoms(
    block: ForceBlock, values: torch.Tensor, points: torch.Tensor, atoms: torch.Tensor | None
) -> torch.Tensor:
    """``[N, 3]`` output of a ``ForceBlock`` (per atom, on its sphere samples), computed on ``atoms`` only."""
    if atoms is None:
        return block(values, points)
    per_atom = values.view(atoms.shape[0], block.num_sphere_samples, -1)
    output = values.new_zeros((atoms.shape[0], 3))
    output[atoms] = block(per_atom[atoms].reshape(-1, per_atom.shape[-1]), points)
    return output


ADAPTER = BackboneAdapter(
    family="escn",
    label="eSCN",
    backbone=f"{__name__}.DeNSeSCNBackbone",
    energy_head="fairchem.core.models.escn.escn.eSCNEnergyHead",
    force_head=f"{__name__}.DeNSeSCNForceHead",
    signature=("layer_blocks.",),
    noise_blocks=("denoising_pos_block",),
    original_prefixes=(
        ("force_block.", "output_heads.forces.force_block."),
        ("energy_block.", "output_heads.energy.energy_block."),
        ("denoising_pos_block.", "output_heads.forces.denoising_pos_block."),
    ),
)
