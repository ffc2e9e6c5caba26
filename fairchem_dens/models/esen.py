"""eSEN with DeNS: fairchem's eSEN backbone plus force encoding, direct and conservative heads.

fairchem 1.10 ships eSEN (the architecture of eSEN-30M-MP / -OAM) and a DeNS copy of
its backbone (``esen_backbone_dens``). Ours wraps the plain ``esen_backbone``
instead: the force encoding enters where fairchem's copy adds it (the node
embeddings right after the atom embedding, before the edge-degree embedding),
through a pre-hook, so fairchem's ``forward`` runs unchanged. Parameter names equal
fairchem's DeNS classes (``backbone.force_embedding``; ``linear`` /
``denoising_linear`` in the direct force head; ``energy_block`` /
``denoising_linear`` in the conservative head), so their state dicts load into ours.

Direct (DeNS pre-training)::

    backbone: {model: fairchem_dens.models.esen.DeNSeSENBackbone, ...}
    heads:
      energy: {module: fairchem.core.models.esen.esen.MLP_Energy_Head}
      forces: {module: fairchem_dens.models.esen.DeNSeSENForceHead}

Conservative (energy, forces and stress as gradients, plus a noise head)::

    backbone: {model: fairchem_dens.models.esen.DeNSeSENBackbone, regress_stress: True, ...}
    heads:
      energy: {module: fairchem_dens.models.esen.DeNSeSENConservativeHead}

Unlike fairchem's ``esen_mlp_efs_head_dens``, which multiplies the energy of a DeNS
batch by 0 (so energy, clean-atom forces and stress learn nothing there), the
conservative head keeps EquiformerV3's semantics: the energy of the original
structure is predicted and trained, clean atoms get ``-dE/dx``, corrupted atoms the
noise head's output; the trainer excludes stress of corrupted structures.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface
from fairchem.core.models.esen.esen import MLP_EFS_Head, eSEN_Backbone
from fairchem.core.models.esen.nn.so3_layers import SO3_Linear
from torch import nn

from fairchem_dens.core.batch import corrupted_atoms, is_dens_batch
from fairchem_dens.core.modules import EDGE_INPUTS, check_noise_head, l1_vectors, zero_weight
from fairchem_dens.core.roles import FORCES
from fairchem_dens.models.adapters import BackboneAdapter
from fairchem_dens.models.dens_features import (
    DeNSBackboneMixin,
    dens_force_output,
    dens_node_features,
    fold_force_encoding_bias,
)
from fairchem_dens.models.esen_noise_block import eSENNoiseBlock

if TYPE_CHECKING:
    from torch_geometric.data import Batch

__all__ = [
    "ADAPTER",
    "DeNSeSENBackbone",
    "DeNSeSENForceHead",
    "DeNSeSENConservativeHead",
    "plain_esen_state_dict",
]

PLAIN_BACKBONE = "fairchem.core.models.esen.esen.eSEN_Backbone"
PLAIN_EFS_HEAD = "fairchem.core.models.esen.esen.MLP_EFS_Head"


@registry.register_model("fairchem_dens_esen_backbone")
class DeNSeSENBackbone(DeNSBackboneMixin, eSEN_Backbone):
    """fairchem's eSEN backbone plus DeNS force encoding.

    The encoding is added to the node embeddings (atom embedding on l = 0) before the
    edge-degree embedding, through a forward pre-hook on ``edge_degree_embedding``.
    Like fairchem's ``esen_backbone_dens`` the layer runs in every mode, so its bias
    reaches the l = 0 coefficients of S2EF batches and inference too.

    Args:
        use_force_encoding: encode the original forces of corrupted atoms (false: ablation).
        force_encoding_scale: multiplies the forces before they are encoded: 1 encodes eV/Å as
            stored, 23.06 kcal/mol/Å as the original MD17 code (docs/algorithm.md#force-encoding).
        **kwargs: every keyword of fairchem's ``eSEN_Backbone``.
    """

    def __init__(self, *, use_force_encoding: bool = True, force_encoding_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._set_force_encoding(use_force_encoding, force_encoding_scale)
        self.force_embedding = SO3_Linear(1, self.sphere_channels, lmax=self.lmax)
        self.edge_degree_embedding.register_forward_pre_hook(self._add_dens_encoding)
        if self.blocks:
            self.blocks[0].register_forward_pre_hook(self._keep_edge_inputs)

    def _keep_edge_inputs(self, module, args):
        # eSEN_Block(x, x_edge, edge_distance, edge_index, wigner, wigner_inv, node_offset): in a
        # DeNS batch, the per-edge inputs go to the heads as emb[EDGE_INPUTS] (a block noise head's)
        data = self._dens_data
        if data is not None and is_dens_batch(data):
            self._dens_outputs[EDGE_INPUTS] = (args[1], args[4], args[5])

    def _add_dens_encoding(self, module, args):
        data = self._dens_data
        if data is None:
            return None
        x_message, *rest = args
        features = dens_node_features(
            data,
            self.force_embedding,
            self.lmax,
            use_force_encoding=self.use_force_encoding,
            force_encoding_scale=self.force_encoding_scale,
        )
        return (x_message + features.to(x_message.dtype), *rest)


def _vectors(layer: SO3_Linear, emb: dict[str, Any]) -> torch.Tensor:
    """``[N, 3]``: the l = 1 output of a one-channel ``SO3_Linear`` on the l <= 1 node features."""
    return l1_vectors(layer, emb["node_embedding"])


class _NoiseHeadChoice:
    """The ``noise_head`` keyword of the eSEN DeNS heads (put it before the head's base class).

    ``linear`` (default): ``denoising_linear``, fairchem's one-channel ``SO3_Linear`` (the
    names of fairchem's eSEN DeNS heads, so their checkpoints load). ``block``:
    ``denoising_block``, an :class:`~fairchem_dens.models.esen_noise_block.eSENNoiseBlock`
    run on the corrupted atoms' incoming edges only.
    """

    def _make_noise_head(self, backbone: eSEN_Backbone, noise_head: str) -> None:
        self.noise_head = check_noise_head(noise_head)
        if noise_head == "block":
            self.denoising_block = eSENNoiseBlock(backbone)
        else:
            self.denoising_linear = SO3_Linear(backbone.sphere_channels, 1, lmax=1)

    @property
    def noise_module(self) -> nn.Module:
        return self.denoising_block if self.noise_head == "block" else self.denoising_linear

    def _noise(self, data: Batch, emb: dict[str, Any], atoms: torch.Tensor | None) -> torch.Tensor:
        """``[N, 3]``, the noise prediction, correct on the rows of ``atoms`` (None: every atom)."""
        if self.noise_head == "linear":
            return _vectors(self.denoising_linear, emb)  # per atom and nearly free: every atom
        node_embedding = emb["node_embedding"]
        if atoms is None:
            atoms = torch.ones(node_embedding.shape[0], dtype=torch.bool, device=node_embedding.device)
        rows = self.denoising_block(data, emb, atoms)
        return rows.new_zeros((node_embedding.shape[0], 3)).index_put((atoms.nonzero().view(-1),), rows)


@registry.register_model("fairchem_dens_esen_force_head")
class DeNSeSENForceHead(_NoiseHeadChoice, nn.Module, HeadInterface):
    """Direct forces of uncorrupted atoms and normalised noise of corrupted ones (eSEN).

    Two one-channel ``SO3_Linear`` layers on the l <= 1 node features, as fairchem's
    ``esen_linear_force_head_dens``: ``linear`` (forces) and ``denoising_linear``
    (noise). Per-atom and nearly free, so both run on every atom when both are used;
    an S2EF batch (validation, prediction, relaxations) never runs the noise layer.

    Args:
        backbone: the DeNS eSEN backbone.
        output_name: name of the output.
        noise_head: ``linear`` (``denoising_linear``) or ``block`` (``denoising_block``, a
            message-passing block on the corrupted atoms only).
    """

    def __init__(self, backbone: eSEN_Backbone, output_name: str = FORCES, noise_head: str = "linear") -> None:
        super().__init__()
        self.output_name = output_name
        self.linear = SO3_Linear(backbone.sphere_channels, 1, lmax=1)
        self._make_noise_head(backbone, noise_head)

    def forward(self, data: Batch, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        forces = dens_force_output(
            data,
            lambda atoms: _vectors(self.linear, emb),
            lambda atoms: self._noise(data, emb, atoms),
            self.linear,
            self.noise_module,
            self.training,
        )
        return {self.output_name: forces}


@registry.register_model("fairchem_dens_esen_conservative_head")
class DeNSeSENConservativeHead(_NoiseHeadChoice, MLP_EFS_Head):
    """Conservative eSEN with DeNS: fairchem's energy/force/stress head plus a noise head.

    fairchem's ``MLP_EFS_Head`` gives the energy and, as its gradients, forces (and
    stress with ``regress_stress``); ``denoising_linear`` predicts the noise. In a
    DeNS batch corrupted atoms output the noise, every other output is fairchem's:
    the energy of the original structure, ``-dE/dx`` on clean atoms, stress (which
    the trainer excludes for corrupted structures). S2EF batches never run the noise
    layer (a zero-weight term keeps it in DDP's graph during training).

    Args:
        backbone: the DeNS eSEN backbone (switched to gradient forces, as fairchem's head does).
        noise_head: ``linear`` (``denoising_linear``) or ``block`` (``denoising_block``, a
            message-passing block on the corrupted atoms only: the paper's MD17 model has a
            whole GraphAttention block as its noise head).
    """

    #: adapters.DENS_CONSERVATIVE: forces are energy gradients plus a noise path (the model check reads it).
    dens_conservative = True

    def __init__(self, backbone: eSEN_Backbone, noise_head: str = "linear") -> None:
        super().__init__(backbone)
        self._make_noise_head(backbone, noise_head)

    def forward(self, data: Batch, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = super().forward(data, emb)
        corrupted = corrupted_atoms(data)
        if bool(corrupted.any()):  # never in S2EF batches
            noise = self._noise(data, emb, corrupted)
            outputs[FORCES] = torch.where(corrupted.view(-1, 1), noise, outputs[FORCES])
        elif self.training:
            outputs[FORCES] = outputs[FORCES] + zero_weight(self.noise_module)
        return outputs


def plain_esen_state_dict(state_dict: dict[str, torch.Tensor]) -> OrderedDict:
    """Our DeNS eSEN weights as fairchem's plain ``eSEN_Backbone`` + ``MLP_EFS_Head`` weights.

    The force encoding's bias is folded into the atom embedding
    (:func:`~fairchem_dens.models.dens_features.fold_force_encoding_bias`), so the plain
    model computes the same energy. The energy head's ``energy_block`` is kept; force,
    noise and other heads are dropped.

    Args:
        state_dict: a hydra state dict of our DeNS eSEN (direct or conservative heads).
    """
    return OrderedDict(
        (key, value)
        for key, value in fold_force_encoding_bias(state_dict).items()
        if key.startswith("backbone.") or key.startswith("output_heads.energy.energy_block.")
    )


ADAPTER = BackboneAdapter(
    family="esen",
    label="eSEN",
    backbone=f"{__name__}.DeNSeSENBackbone",
    energy_head="fairchem.core.models.esen.esen.MLP_Energy_Head",
    force_head=f"{__name__}.DeNSeSENForceHead",
    conservative_head=f"{__name__}.DeNSeSENConservativeHead",
    signature=("blocks.0.edge_wise.",),
    noise_blocks=("denoising_linear", "denoising_block"),
    # fairchem's eSEN energy/forces/stress heads: plain, and DeNS (which zeroes DeNS batches' energy)
    gradient_force_heads=("esen_mlp_efs_head", "esen_mlp_efs_head_dens"),
)
