"""eSCN-MD and UMA with DeNS: force encoding in the backbone, a direct DeNS force head.

fairchem's ``eSCNMDBackbone.forward`` runs unchanged: the force encoding of corrupted
atoms is added to the node embeddings right after the atom embedding, before the
edge-degree embedding (where DeNS puts it), by a forward pre-hook on
``edge_degree_embedding``. The backbone's own ``forward`` only keeps the batch at hand
for the hook. The UMA mixture-of-experts backbone subclasses eSCN-MD without
overriding ``forward``, so the same hook serves it.

In a batch the trainer did not corrupt (validation, prediction, the ASE calculator)
the hook adds the encoding layer's bias to every atom's l = 0 features (the encoding of
a zero force, as in the original DeNS) and the force head is fairchem's
``Linear_Force_Head``: the model is the plain one with that bias folded into its atom
embedding, which is what the plain inference checkpoint holds. During training such a batch still puts the DeNS
parameters in the graph with weight 0, because fairchem's DDP runs without a search
for unused parameters.

Conservative DeNS (energy, forces = -dE/dx and stress, plus a noise head)::

    backbone: {model: fairchem_dens.fairchem2.models.DeNSeSCNMDBackbone, direct_forces: False,
               regress_stress: True, otf_graph: True, ...}
    heads:
      efs: {module: fairchem_dens.fairchem2.models.DeNSMLPEFSHead}
    pass_through_head_outputs: True

Direct DeNS pre-training::

    backbone: {model: fairchem_dens.fairchem2.models.DeNSeSCNMDBackbone, otf_graph: True, ...}
    heads:
      energy: {module: fairchem.core.models.uma.escn_md.MLP_Energy_Head}
      forces: {module: fairchem_dens.fairchem2.models.DeNSLinearForceHead}

Each DeNS class names its plain fairchem class (``fairchem_plain``) and the
parameters only DeNS uses (``dens_parameter_prefixes``), which the inference
checkpoint drops (:mod:`fairchem_dens.fairchem2.export`).
"""

from __future__ import annotations

from typing import Any

import torch
from fairchem.core.common import gp_utils
from fairchem.core.common.registry import registry
from fairchem.core.models.uma.escn_md import Linear_Force_Head, MLP_EFS_Head, eSCNMDBackbone
from fairchem.core.models.uma.escn_moe import eSCNMDMoeBackbone
from fairchem.core.models.uma.nn.so3_layers import SO3_Linear
from torch import nn

from fairchem_dens.core.batch import corrupted_atoms, is_dens_batch
from fairchem_dens.core.encoding import check_force_encoding_scale, force_encoding_coefficients
from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.core.modules import EDGE_INPUTS, BatchDuringForward, check_noise_head, l1_vectors, zero_weight
from fairchem_dens.core.roles import FORCES
from fairchem_dens.fairchem2.noise_block import eSCNMDNoiseBlock

__all__ = ["ENCODED_FORCES", "DeNSeSCNMDBackbone", "DeNSeSCNMDMoeBackbone", "DeNSLinearForceHead", "DeNSMLPEFSHead"]

#: The batch key of the forces the encoding reads: the original structure's force labels
#: of every atom (eV/Å), gathered from all force tasks by the unit.
ENCODED_FORCES = "dens_forces"


def refuse_graph_parallel() -> None:
    """Refuses graph parallelism, whose ranks each embed only their share of a batch's atoms."""
    if gp_utils.initialized():
        raise DeNSSetupError(
            "DeNS on fairchem 2 does not support graph parallelism: there each rank embeds only its share "
            "of a structure's atoms, while the force encoding and the noise head index the corrupted atoms "
            "and their edges over the whole batch. Set job.graph_parallel_group_size to 1 (plain data "
            "parallelism works)."
        )


class DeNSForceEncoding(BatchDuringForward):
    """The force encoding of a fairchem-2 eSCN-MD backbone (put it first in the bases).

    ``force_embedding`` (``SO3_Linear``, 1 -> ``sphere_channels``, one weight per degree
    up to ``lmax``) maps the spherical-harmonic coefficients of each corrupted atom's
    original force (:func:`fairchem_dens.core.encoding.force_encoding_coefficients`,
    the forces times ``force_encoding_scale``) to node features. Clean atoms and batches
    the trainer did not corrupt encode a zero force, so they get the layer's l = 0 bias
    alone, on every atom, as in the original DeNS; the plain inference checkpoint folds
    that bias into the atom embedding (:mod:`fairchem_dens.fairchem2.export`).

    Args:
        force_encoding_scale: multiplies the forces before they are encoded: 1 encodes eV/Å
            as stored, 23.06 kcal/mol/Å as the original MD17 code (docs/algorithm.md#force-encoding).
    """

    fairchem_plain: str
    dens_parameter_prefixes = ("force_embedding.",)

    def __init__(self, *args: Any, force_encoding_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.force_encoding_scale = check_force_encoding_scale(force_encoding_scale)
        self.force_embedding = SO3_Linear(1, self.sphere_channels, lmax=self.lmax)
        # A bound method: the EMA deep copy rebinds it to the copy's own layer.
        self.edge_degree_embedding.register_forward_pre_hook(self._add_force_encoding)
        self.blocks[0].register_forward_pre_hook(self._keep_edge_inputs)

    def _keep_edge_inputs(self, module: nn.Module, args: tuple) -> None:
        # eSCNMD_Block(x, x_edge, edge_index, wigner, wigner_inv_envelope, ...): in a DeNS batch the
        # per-edge inputs go to the heads as emb[EDGE_INPUTS] (:mod:`fairchem_dens.fairchem2.noise_block`)
        data = self._dens_data
        if data is not None and is_dens_batch(data):
            self._dens_outputs[EDGE_INPUTS] = (args[2], args[1], args[3], args[4])

    def _add_force_encoding(self, module: nn.Module, args: tuple) -> tuple | None:
        data = self._dens_data
        if data is None:
            return None
        x_message, *rest = args
        dens_batch = is_dens_batch(data)
        if dens_batch:
            refuse_graph_parallel()
        # float32 whatever the autocast: the harmonics of small forces lose digits in bf16
        with torch.autocast(device_type=x_message.device.type, enabled=False):
            if dens_batch:
                coefficients = force_encoding_coefficients(
                    data[ENCODED_FORCES].float(), self.lmax, corrupted_atoms(data), self.force_encoding_scale
                )
            else:  # every atom encodes a zero force: the layer adds its l = 0 bias (the weight enters with 0)
                coefficients = x_message.new_zeros((1, (self.lmax + 1) ** 2), dtype=torch.float32)
            features = self.force_embedding(coefficients.unsqueeze(-1))
        return (x_message + features.to(x_message.dtype), *rest)


@registry.register_model("fairchem_dens_escnmd_backbone")
class DeNSeSCNMDBackbone(DeNSForceEncoding, eSCNMDBackbone):
    """fairchem's ``eSCNMDBackbone`` plus the DeNS force encoding (same keywords)."""

    fairchem_plain = "fairchem.core.models.uma.escn_md.eSCNMDBackbone"


@registry.register_model("fairchem_dens_escnmd_moe_backbone")
class DeNSeSCNMDMoeBackbone(DeNSForceEncoding, eSCNMDMoeBackbone):
    """fairchem's UMA mixture-of-experts backbone plus the DeNS force encoding (same keywords).

    The encoding is added before the expert layers, so it does not change the routing
    (which reads the composition and the system embedding only).
    """

    fairchem_plain = "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone"


class _NoiseHead:
    """The ``noise_head`` keyword of the fairchem-2 DeNS heads (put it before the head's base class).

    ``linear`` (default): ``noise_linear``, one-channel ``SO3_Linear`` on the l <= 1 features.
    ``block``: ``noise_block``, an :class:`~fairchem_dens.fairchem2.noise_block.eSCNMDNoiseBlock`
    on the corrupted atoms' incoming edges. Either runs on corrupted atoms only, and the plain
    inference checkpoint drops it.
    """

    dens_parameter_prefixes = ("noise_linear.", "noise_block.")
    #: Read by the unit: this head writes the noise prediction into ``forces``.
    dens_force_head = True

    def _make_noise_head(self, backbone: eSCNMDBackbone, noise_head: str) -> None:
        self.noise_head = check_noise_head(noise_head)
        if noise_head == "block":
            self.noise_block = eSCNMDNoiseBlock(backbone)
        else:
            self.noise_linear = SO3_Linear(backbone.sphere_channels, 1, lmax=1)

    @property
    def noise_module(self) -> nn.Module:
        return self.noise_block if self.noise_head == "block" else self.noise_linear

    def _noise(self, emb: dict[str, Any], corrupted: torch.Tensor) -> torch.Tensor:
        """``[n, 3]``: the noise prediction of the corrupted atoms (bool mask), in atom order."""
        node_embedding = emb["node_embedding"]
        if self.noise_head == "linear" or not bool(corrupted.any()):
            # An empty block still enters the graph (a zero gradient), as DDP needs.
            layer = self.noise_linear if self.noise_head == "linear" else self.noise_block.output
            noise = l1_vectors(layer, node_embedding.index_select(0, corrupted.nonzero().view(-1)))
            return noise if self.noise_head == "linear" else noise + zero_weight(self.noise_block)
        return self.noise_block(node_embedding, emb[EDGE_INPUTS], corrupted)


@registry.register_model("fairchem_dens_linear_force_head")
class DeNSLinearForceHead(_NoiseHead, Linear_Force_Head):
    """fairchem's ``Linear_Force_Head`` plus a noise head (``noise_head``: linear or block).

    The ``forces`` output holds the normalised noise prediction on corrupted atoms and
    the force prediction on the others; each block runs on its own atoms only. A batch
    without corruption runs fairchem's head unchanged.
    """

    fairchem_plain = "fairchem.core.models.uma.escn_md.Linear_Force_Head"

    def __init__(self, backbone: eSCNMDBackbone, noise_head: str = "linear") -> None:
        super().__init__(backbone)
        self._make_noise_head(backbone, noise_head)

    def forward(self, data, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not is_dens_batch(data):
            outputs = super().forward(data, emb)
            if self.training:
                outputs[FORCES] = outputs[FORCES] + zero_weight(self.noise_module)
            return outputs
        refuse_graph_parallel()
        node_embedding = emb["node_embedding"]
        corrupted = corrupted_atoms(data).to(node_embedding.device)
        noisy, clean = corrupted.nonzero().view(-1), (~corrupted).nonzero().view(-1)
        noise = self._noise(emb, corrupted)
        forces = l1_vectors(self.linear, node_embedding.index_select(0, clean))
        output = noise.new_zeros((node_embedding.shape[0], 3))
        output = output.index_put((noisy,), noise).index_put((clean,), forces)
        return {FORCES: output}


@registry.register_model("fairchem_dens_mlp_efs_head")
class DeNSMLPEFSHead(_NoiseHead, MLP_EFS_Head):
    """fairchem's conservative ``MLP_EFS_Head`` plus a noise head (``noise_head``: linear or block), EquiformerV3's semantics.

    In a DeNS batch the energy is the original structure's (trained on its label), clean
    atoms get ``-dE/dx`` (at the corrupted geometry, as in the paper), corrupted atoms the
    noise head's output, run on those atoms only; stress is fairchem's, and the unit leaves
    corrupted structures out of its loss (role ``excluded``). Any other batch runs
    fairchem's head unchanged. Keywords as ``MLP_EFS_Head`` (``prefix``, ``wrap_property``).
    """

    fairchem_plain = "fairchem.core.models.uma.escn_md.MLP_EFS_Head"

    def __init__(self, backbone: eSCNMDBackbone, noise_head: str = "linear", **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self._make_noise_head(backbone, noise_head)

    def forward(self, data, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = super().forward(data, emb)
        key = f"{self.prefix}_{FORCES}" if self.prefix else FORCES
        forces = outputs[key][FORCES] if self.wrap_property else outputs[key]
        if not is_dens_batch(data):
            if not self.training:
                return outputs
            forces = forces + zero_weight(self.noise_module)
        else:
            refuse_graph_parallel()
            corrupted = corrupted_atoms(data).to(forces.device)
            noise = self._noise(emb, corrupted)
            forces = forces.index_put((corrupted.nonzero().view(-1),), noise.to(forces.dtype))
        outputs[key] = {FORCES: forces} if self.wrap_property else forces
        return outputs
