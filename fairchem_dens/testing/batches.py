"""Batches for model tests: the fixture batch, rotated copies, DeNS-corrupted copies.

A DeNS batch is corrupted by the trainer's own code (:func:`fairchem_dens.core.batch.corrupt_batch`),
so a test sees exactly what training feeds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Batch, Data

__all__ = [
    "batch_from_tensors",
    "rotation_matrix",
    "rotate_batch",
    "corrupt_like_trainer",
    "dens_mode_batch",
    "mixed_dens_batch",
]


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

    config = DeNSConfig.from_optim(
        {
            "use_denoising_pos": enabled,
            "denoising_pos_coefficient": 10.0,
            "denoising_pos_params": {"prob": 1.0, "fixed_noise_std": True, "std": 0.1, **params},
        }
    )
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
            0, batch.batch[batch.noise_mask], True
        )
        if 0 < int(corrupted.sum()) < batch.natoms.numel():
            return batch, corrupted
    raise AssertionError(f"no batch of the first {max_steps} steps mixed corrupted and clean structures")


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
