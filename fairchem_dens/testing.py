"""Helpers shared by the test suite and the benchmarks: tiny models, batches, rotations.

Kept in the package (like e3nn's equivariance checkers) so that a new backbone's
tests and the benchmark scripts reuse one definition of "tiny model" and
"rotated batch".
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Batch, Data

from fairchem_dens.datasets.lmdb_io import close_lmdb, read_lmdb, write_lmdb

__all__ = [
    "TINY_EQV2_BACKBONE",
    "TINY_ESCN_BACKBONE",
    "TINY_ESEN_BACKBONE",
    "escn_dens_model_config",
    "esen_dens_model_config",
    "eqv2_dens_model_config",
    "build_model",
    "batch_from_tensors",
    "rotation_matrix",
    "rotate_batch",
    "forward_seeded",
    "fairchem_trainer",
    "dens_mode_batch",
    "read_lmdb",
    "lmdb_without",
    "write_variant",
    "corrupt_like_trainer",
    "mixed_dens_batch",
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
    flavour: str = "ours", backbone: dict[str, Any] | None = None, **dens: Any
) -> dict[str, Any]:
    """A hydra model config for eSEN.

    Args:
        flavour: ``ours`` (direct DeNS heads), ``ours_conservative`` (gradient forces and
            stress + noise head), ``fairchem`` / ``fairchem_conservative`` (fairchem 1.10's
            ``esen_*_dens`` classes), ``plain`` / ``plain_conservative`` (fairchem's eSEN).
        backbone: backbone keywords (default :data:`TINY_ESEN_BACKBONE`).
        **dens: DeNS backbone keywords (``use_force_encoding``).
    """
    kwargs = copy.deepcopy(backbone or TINY_ESEN_BACKBONE)
    esen, port, ours = "fairchem.core.models.esen.esen", "fairchem.core.models.esen.esen_dens", "fairchem_dens.models.esen"
    conservative = flavour.endswith("_conservative")
    base = flavour.removesuffix("_conservative")
    backbone_class = {"ours": f"{ours}.DeNSeSENBackbone", "fairchem": f"{port}.eSEN_DeNS_Backbone",
                      "plain": f"{esen}.eSEN_Backbone"}.get(base)
    if backbone_class is None:
        raise ValueError(f"unknown flavour {flavour!r}")
    kwargs.update(model=backbone_class, **dens)
    if conservative:
        kwargs.setdefault("regress_stress", True)
        head = {"ours": f"{ours}.DeNSeSENConservativeHead", "fairchem": f"{port}.MLP_EFS_Head",
                "plain": f"{esen}.MLP_EFS_Head"}[base]
        return _hydra(kwargs, {"energy": {"module": head}})
    forces = {"ours": f"{ours}.DeNSeSENForceHead", "fairchem": f"{port}.Linear_Force_Head_DeNS",
              "plain": f"{esen}.Linear_Force_Head"}[base]
    return _hydra(kwargs, {"energy": {"module": f"{esen}.MLP_Energy_Head"}, "forces": {"module": forces}})


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


def batch_from_tensors(tensors: dict[str, torch.Tensor] | str | Path) -> Batch:
    """A PyG batch from a dict of batched tensors (the layout of ``inputs.pt``)."""
    if not isinstance(tensors, dict):
        tensors = torch.load(tensors, weights_only=True)
    natoms = tensors["natoms"].tolist()
    starts = [0, *torch.cumsum(torch.tensor(natoms), 0).tolist()]
    data_list = []
    for s, n in enumerate(natoms):
        atoms = slice(starts[s], starts[s] + n)
        data_list.append(
            Data(
                pos=tensors["pos"][atoms].clone(),
                cell=tensors["cell"][s : s + 1].clone(),
                atomic_numbers=tensors["atomic_numbers"][atoms].clone(),
                natoms=torch.tensor([n]),
                fixed=tensors["fixed"][atoms].clone(),
                tags=tensors["tags"][atoms].clone(),
                forces=tensors["forces"][atoms].clone(),
                energy=tensors["energy"][s : s + 1].clone(),
                pbc=tensors["pbc"][s : s + 1].clone(),
                sid=tensors["sid"][s : s + 1].clone(),
                fid=tensors["fid"][s : s + 1].clone(),
            )
        )
    return Batch.from_data_list(data_list)


def rotation_matrix(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random proper rotation (det +1)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def rotate_batch(batch: Batch, rotation: torch.Tensor) -> Batch:
    """Rotates positions, cell rows and the forces that DeNS encodes."""
    rotated = batch.clone()
    rotated.pos = batch.pos @ rotation.T
    rotated.cell = batch.cell @ rotation.T
    rotated.forces = batch.forces @ rotation.T
    for key in ("noise_vec",):
        if hasattr(batch, key):
            setattr(rotated, key, getattr(batch, key) @ rotation.T)
    return rotated


def forward_seeded(model: torch.nn.Module, batch: Batch, seed: int = 7) -> dict[str, torch.Tensor]:
    """Forward with the torch RNG seeded first (EquiformerV2's edge frames draw from it)."""
    torch.manual_seed(seed)
    return model(batch)



def corrupt_like_trainer(batch: Batch, *, seed: int = 0, step: int = 1, enabled: bool = True, **params: Any) -> Batch:
    """A copy of ``batch`` corrupted by the trainer's own code (``sample_corruption`` + ``apply_corruption``).

    Args:
        batch: a collated batch (an ``md`` attribute is honoured).
        seed: the run seed of the draws.
        step: the training step of the draws.
        enabled: ``use_denoising_pos`` (False: the batch stays an S2EF batch).
        **params: ``denoising_pos_params`` over the defaults prob 1, fixed σ 0.1 Å.
    """
    from fairchem_dens.core.batch import corrupt_batch
    from fairchem_dens.core.settings import DeNSConfig

    config = DeNSConfig.from_optim({
        "use_denoising_pos": enabled, "denoising_pos_coefficient": 10.0,
        "denoising_pos_params": {"prob": 1.0, "fixed_noise_std": True, "std": 0.1, **params},
    })
    batch = batch.clone()
    corrupt_batch(config, batch, seed=seed, step=step)
    return batch


def mixed_dens_batch(trainer, max_steps: int = 60) -> tuple[Batch, torch.Tensor]:
    """A training batch the trainer corrupted with both corrupted and clean structures.

    Returns:
        The batch and the bool ``[B]`` of its corrupted structures (read from ``noise_mask``).
    """
    for step in range(1, max_steps):
        batch = next(iter(trainer.train_loader))
        if not trainer.corrupt(batch, step=step):
            continue
        corrupted = torch.zeros(batch.natoms.numel(), dtype=torch.bool).index_fill_(
            0, batch.batch[batch.noise_mask], True)
        if 0 < int(corrupted.sum()) < batch.natoms.numel():
            return batch, corrupted
    raise AssertionError(f"no batch of the first {max_steps} steps mixed corrupted and clean structures")


def write_variant(config_yml: str | Path, path: str | Path, edit) -> Path:
    """A copy of a config (``includes:`` resolved as fairchem does) changed by ``edit(config)``.

    For configs the command line cannot express (a removed output, another model).
    """
    import yaml
    from fairchem.core.common.utils import load_config

    config, _, _ = load_config(str(config_yml))
    edit(config)
    path = Path(path)
    path.write_text(yaml.safe_dump(config))
    return path


def lmdb_without(source: str | Path, field: str, folder: str | Path) -> Path:
    """A copy of an LMDB data set whose entries lack ``field`` (bad-input tests)."""
    entries = read_lmdb(source)
    for data in entries:
        delattr(data, field)
    folder = Path(folder)
    folder.mkdir(parents=True)
    write_lmdb(entries, folder / "data.lmdb")
    return folder


def dens_mode_batch(batch: Batch, mode: str, seed: int = 0, sigma: float = 0.1) -> Batch:
    """A copy of ``batch`` as an S2EF (``s2ef``), full- or partial-corruption (``full``, ``partial``) batch.

    Made by the trainer's corruption code (:func:`corrupt_like_trainer`): every structure is
    selected; ``full`` corrupts every atom, fixed ones included (``all_atoms``, so the batch
    carries no ``noise_mask``); ``partial`` each free atom with probability 1/2.
    """
    if mode == "s2ef":
        return batch.clone()
    params = {"corrupt_ratio": 0.5} if mode == "partial" else {"all_atoms": True}
    return corrupt_like_trainer(batch, seed=seed, std=sigma, **params)


@contextlib.contextmanager
def fairchem_trainer(config_yml: str | Path, run_dir: str | Path, *overrides: str, mode: str = "train"):
    """A trainer built by fairchem's own CLI code path (flags, includes, registry).

    Args:
        config_yml: a config file (``includes:`` resolved as fairchem does).
        run_dir: where checkpoints, results and logs go.
        *overrides: ``--key.sub=value`` overrides, exactly as on the command line.
        mode: the ``--mode``.

    Yields:
        fairchem's training context (``.trainer``, ``.task``, ``.config``).
    """
    from fairchem.core.common import distutils
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config, new_trainer_context

    args, override_args = flags.get_parser().parse_known_args(
        ["--mode", mode, "--config-yml", str(config_yml), "--cpu", "--run-dir", str(run_dir),
         "--timestamp-id", "test", *overrides]
    )
    config = build_config(args, override_args)
    if "RANK" not in os.environ or config.get("world_size", 1) == 1:
        distutils.setup_env_local()  # a single rank; multi-rank callers set RANK etc. themselves
    context = new_trainer_context(config=config)
    ctx = None
    try:
        ctx = context.__enter__()
        yield ctx
    finally:
        # py-lmdb refuses to open a file twice in one process: close what this trainer opened.
        trainer = getattr(ctx, "trainer", None)
        for name in ("train_dataset", "val_dataset", "test_dataset", "relax_dataset"):
            close_lmdb(getattr(trainer, name, None))
        gc.collect()  # datasets of a trainer that failed while being built close on collection
        # fairchem's context tears down torch.distributed only on a clean exit.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
