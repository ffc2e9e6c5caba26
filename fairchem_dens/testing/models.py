"""Tiny models of every backbone, as fairchem builds them, and a seeded forward.

Small enough for a CPU test, so that a new backbone's tests, the shared suite
(:mod:`fairchem_dens.testing.backbone_suite`) and the benchmarks share one "tiny model".
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch_geometric.data import Batch

__all__ = [
    "TINY_EQV2_BACKBONE",
    "TINY_ESCN_BACKBONE",
    "TINY_ESEN_BACKBONE",
    "eqv2_dens_model_config",
    "escn_dens_model_config",
    "esen_dens_model_config",
    "build_model",
    "forward_seeded",
]

# Small enough for seconds per step on a laptop CPU, big enough to exercise every block.
TINY_EQV2_BACKBONE: dict[str, Any] = {
    "use_pbc": True,
    "use_pbc_single": False,
    "regress_forces": True,
    "otf_graph": True,
    "max_neighbors": 12,
    "max_radius": 5.0,
    "max_num_elements": 90,
    "num_layers": 2,
    "sphere_channels": 16,
    "attn_hidden_channels": 16,
    "num_heads": 2,
    "attn_alpha_channels": 8,
    "attn_value_channels": 4,
    "ffn_hidden_channels": 16,
    "norm_type": "layer_norm_sh",
    "lmax_list": [2],
    "mmax_list": [1],
    "grid_resolution": 8,
    "num_sphere_samples": 16,
    "edge_channels": 16,
    "use_atom_edge_embedding": True,
    "share_atom_edge_embedding": False,
    "use_m_share_rad": False,
    "distance_function": "gaussian",
    "num_distance_basis": 64,
    "attn_activation": "silu",
    "use_s2_act_attn": False,
    "use_attn_renorm": True,
    "ffn_activation": "silu",
    "use_gate_act": False,
    "use_grid_mlp": True,
    "use_sep_s2_act": True,
    "alpha_drop": 0.0,
    "drop_path_rate": 0.0,
    "proj_drop": 0.0,
    "weight_init": "uniform",
    "enforce_max_neighbors_strictly": False,
    "avg_num_nodes": 13.0,
    "avg_degree": 10.0,
}

TINY_ESCN_BACKBONE: dict[str, Any] = {
    "use_pbc": True,
    "regress_forces": True,
    "otf_graph": True,
    "max_neighbors": 12,
    "cutoff": 5.0,
    "max_num_elements": 90,
    "num_layers": 2,
    "lmax_list": [2],
    "mmax_list": [1],
    "sphere_channels": 16,
    "hidden_channels": 16,
    "edge_channels": 16,
    "num_sphere_samples": 16,
    "distance_function": "gaussian",
    "basis_width_scalar": 2.0,
    "distance_resolution": 0.02,
}

OURS = "fairchem_dens.models.equiformer_v2"
FAIRCHEM_PORT = "fairchem.core.models.equiformer_v2.equiformer_v2_dens"
FAIRCHEM_PLAIN = "fairchem.core.models.equiformer_v2"


def eqv2_dens_model_config(
    flavour: str = "ours", backbone: dict[str, Any] | None = None, **dens: Any
) -> dict[str, Any]:
    """A hydra model config for EquiformerV2 (+DeNS).

    Args:
        flavour: ``ours`` (this plugin), ``fairchem`` (fairchem 1.10's own DeNS
            port) or ``plain`` (fairchem's EquiformerV2 without DeNS).
        backbone: backbone keywords (default :data:`TINY_EQV2_BACKBONE`).
        **dens: DeNS backbone keywords (``use_force_encoding``, ...).
    """
    kwargs = copy.deepcopy(backbone or TINY_EQV2_BACKBONE)
    if flavour == "ours":
        kwargs.update(model=f"{OURS}.DeNSEquiformerV2Backbone", **dens)
        heads = {
            "energy": {"module": f"{OURS}.DeNSEquiformerV2EnergyHead"},
            "forces": {"module": f"{OURS}.DeNSEquiformerV2ForceHead"},
        }
    elif flavour == "fairchem":
        kwargs.update(model=f"{FAIRCHEM_PORT}.EqV2DeNSBackbone", **dens)
        heads = {
            "energy": {"module": f"{FAIRCHEM_PORT}.DeNSScalarHead"},
            "forces": {"module": f"{FAIRCHEM_PORT}.DeNSVectorHead"},
        }
    elif flavour == "plain":
        kwargs.update(model=f"{FAIRCHEM_PLAIN}.equiformer_v2.EquiformerV2Backbone")
        heads = {
            "energy": {"module": f"{FAIRCHEM_PLAIN}.heads.scalar.EqV2ScalarHead"},
            "forces": {"module": f"{FAIRCHEM_PLAIN}.heads.vector.EqV2VectorHead"},
        }
    else:
        raise ValueError(f"unknown flavour {flavour!r}")
    return _hydra(kwargs, heads)


def escn_dens_model_config(
    flavour: str = "ours", backbone: dict[str, Any] | None = None, **dens: Any
) -> dict[str, Any]:
    """A hydra model config for eSCN: ``ours`` (DeNS) or ``plain`` (fairchem's eSCN)."""
    kwargs = copy.deepcopy(backbone or TINY_ESCN_BACKBONE)
    escn = "fairchem.core.models.escn.escn"
    if flavour == "ours":
        kwargs.update(model="fairchem_dens.models.escn.DeNSeSCNBackbone", **dens)
        forces = "fairchem_dens.models.escn.DeNSeSCNForceHead"
    elif flavour == "plain":
        kwargs.update(model=f"{escn}.eSCNBackbone")
        forces = f"{escn}.eSCNForceHead"
    else:
        raise ValueError(f"unknown flavour {flavour!r}")
    return _hydra(kwargs, {"energy": {"module": f"{escn}.eSCNEnergyHead"}, "forces": {"module": forces}})


#: A tiny eSEN (fairchem's ``esen_backbone`` keywords) that runs in well under a second on a CPU.
TINY_ESEN_BACKBONE: dict[str, Any] = {
    "sphere_channels": 16,
    "hidden_channels": 16,
    "edge_channels": 16,
    "lmax": 2,
    "mmax": 2,
    "num_layers": 2,
    "num_distance_basis": 16,
    "act_type": "gate",
    "mlp_type": "spectral",
    "cutoff": 5.0,
    "max_neighbors": 30,
    "otf_graph": True,
    "use_pbc": True,
    "regress_forces": True,
}


def esen_dens_model_config(
    flavour: str = "ours", backbone: dict[str, Any] | None = None, noise_head: str | None = None, **dens: Any
) -> dict[str, Any]:
    """A hydra model config for eSEN.

    Args:
        flavour: ``ours`` (direct DeNS heads), ``ours_conservative`` (gradient forces and
            stress + noise head), ``fairchem`` / ``fairchem_conservative`` (fairchem 1.10's
            ``esen_*_dens`` classes), ``plain`` / ``plain_conservative`` (fairchem's eSEN).
        backbone: backbone keywords (default :data:`TINY_ESEN_BACKBONE`).
        noise_head: the ``noise_head`` keyword of our DeNS head (``linear`` / ``block``; None: its default).
        **dens: DeNS backbone keywords (``use_force_encoding``).
    """
    kwargs = copy.deepcopy(backbone or TINY_ESEN_BACKBONE)
    choice = {} if noise_head is None or not flavour.startswith("ours") else {"noise_head": noise_head}
    esen, port, ours = (
        "fairchem.core.models.esen.esen",
        "fairchem.core.models.esen.esen_dens",
        "fairchem_dens.models.esen",
    )
    conservative = flavour.endswith("_conservative")
    base = flavour.removesuffix("_conservative")
    backbone_class = {
        "ours": f"{ours}.DeNSeSENBackbone",
        "fairchem": f"{port}.eSEN_DeNS_Backbone",
        "plain": f"{esen}.eSEN_Backbone",
    }.get(base)
    if backbone_class is None:
        raise ValueError(f"unknown flavour {flavour!r}")
    kwargs.update(model=backbone_class, **dens)
    if conservative:
        kwargs.setdefault("regress_stress", True)
        head = {
            "ours": f"{ours}.DeNSeSENConservativeHead",
            "fairchem": f"{port}.MLP_EFS_Head",
            "plain": f"{esen}.MLP_EFS_Head",
        }[base]
        return _hydra(kwargs, {"energy": {"module": head, **choice}})
    forces = {
        "ours": f"{ours}.DeNSeSENForceHead",
        "fairchem": f"{port}.Linear_Force_Head_DeNS",
        "plain": f"{esen}.Linear_Force_Head",
    }[base]
    return _hydra(kwargs, {"energy": {"module": f"{esen}.MLP_Energy_Head"}, "forces": {"module": forces, **choice}})


def _hydra(backbone: dict[str, Any], heads: dict[str, Any]) -> dict[str, Any]:
    """fairchem's hydra model config around a backbone and its heads."""
    return {"name": "hydra", "pass_through_head_outputs": True, "otf_graph": True, "backbone": backbone, "heads": heads}


def build_model(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """Builds a model from a fairchem model config, as fairchem's trainers do."""
    import fairchem.core.models.base  # noqa: F401  (registers `hydra`)
    from fairchem.core.common.registry import registry

    config = copy.deepcopy(config)
    torch.manual_seed(seed)
    name = config.pop("name")
    return registry.get_model_class(name)(**config)


def forward_seeded(model: torch.nn.Module, batch: Batch, seed: int = 7) -> dict[str, torch.Tensor]:
    """Forward of a copy of ``batch`` with the torch RNG seeded first (EquiformerV2's edge frames draw from it).

    A copy: gradient-force models replace ``batch.pos`` by a tensor that needs grad.
    """
    torch.manual_seed(seed)
    return model(batch.clone())
