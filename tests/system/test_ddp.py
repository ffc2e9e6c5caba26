"""DeNS under torch.distributed (gloo, 2 CPU ranks): same decisions, same loss, same gradients."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
import torch.multiprocessing as mp
from torch_geometric.data import Batch

from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.testing import batch_from_tensors, fairchem_trainer, read_lmdb
from fairchem_dens.testing.tolerances import GRADIENT_ULPS, LOSS_REL, assert_ulps

from helpers import DATA, QUICKSTART, data_overrides

P = "--optim.denoising_pos_params."
CASES = {
    "partial": [f"{P}corrupt_ratio=0.5"],
    "full": [f"{P}corrupt_ratio=None"],
    "relaxation_only": [f"{P}relaxation_only=True", f"{P}corrupt_ratio=0.5"],
    "separate_means": [f"{P}corrupt_ratio=0.5", f"{P}loss_form=separate_means"],
}


def global_batch(case: str) -> Batch:
    batch = batch_from_tensors(DATA / "inputs.pt")  # 13, 13, 18 and 20 atoms: unequal halves
    if case == "relaxation_only":
        batch.md = torch.tensor([0, 1, 0, 1])
    return batch


def split(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's structures of an already corrupted global batch (per-atom DeNS fields kept)."""
    per_rank = batch.natoms.numel() // world
    structures = list(range(rank * per_rank, (rank + 1) * per_rank))
    part = Batch.from_data_list([batch.to_data_list()[s] for s in structures])  # corrupted positions
    atoms = torch.cat([torch.nonzero(batch.batch == s).view(-1) for s in structures])
    # fields attached after collation are not sliced by to_data_list: take them by atom index
    for key in ("noise_vec", "denoising_target", "sigmas", "noise_mask"):
        if hasattr(batch, key):
            setattr(part, key, getattr(batch, key)[atoms])
    part.denoising_pos_forward = True
    return part


def corrupted_global_batch(trainer, case):
    batch = global_batch(case)
    assert trainer.corrupt(batch, step=1, rank=0)
    return batch


def _worker(rank, world, port, case, emt_data, run_dir, result_path):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    overrides = [*data_overrides(emt_data), f"{P}prob=1.0", "--num-gpus", str(world), *CASES[case]]
    with fairchem_trainer(QUICKSTART / "eqv2_dens_tiny.yml", run_dir, *overrides) as ctx:
        trainer = ctx.trainer
        assert torch.distributed.get_world_size() == world
        # every rank takes the same batch-level decision at every step
        decisions = []
        for step in range(30):
            trainer.dens = trainer.dens.__class__(**{**trainer.dens.__dict__, "prob": 0.5})
            decisions.append(trainer.corrupt(global_batch(case), step=step, rank=rank))
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, decisions)
        trainer.dens = trainer.dens.__class__(**{**trainer.dens.__dict__, "prob": 1.0})
        # the same global corruption on every rank (drawn as rank 0), then each rank takes its half
        batch = split(corrupted_global_batch(trainer, case), rank, world)
        trainer.model.eval()  # no re-corruption in _forward; dropout is off in the tiny model anyway
        loss, grads = loss_and_grads_eval(trainer, batch)
        losses = [None] * world
        torch.distributed.all_gather_object(losses, float(loss))
        if rank == 0:
            torch.save({"decisions": gathered, "losses": losses, "grads": grads}, result_path)


def loss_and_grads_eval(trainer, batch):
    trainer.optimizer.zero_grad()
    torch.manual_seed(0)
    out = trainer._forward(batch)
    loss = trainer._compute_loss(out, batch)
    loss.backward()  # DDP all-reduces (averages) the gradients here
    return loss.detach(), {
        n: p.grad.detach().clone() for n, p in trainer._unwrapped_model.named_parameters() if p.grad is not None
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_rank(emt_data, tmp_path, case):
    result_path = tmp_path / "ranks.pt"
    mp.start_processes(
        _worker, args=(2, free_port(), case, emt_data, tmp_path / "ddp", result_path), nprocs=2, start_method="spawn"
    )
    ranks = torch.load(result_path, weights_only=False)
    assert ranks["decisions"][0] == ranks["decisions"][1]
    assert any(ranks["decisions"][0]) and not all(ranks["decisions"][0])

    # the same global batch on one rank
    with fairchem_trainer(
        QUICKSTART / "eqv2_dens_tiny.yml", tmp_path / "single", *data_overrides(emt_data), f"{P}prob=1.0", *CASES[case]
    ) as ctx:
        trainer = ctx.trainer
        batch = corrupted_global_batch(trainer, case)
        if case == "relaxation_only":
            md_atoms = batch.md.bool()[batch.batch]
            assert batch.noise_mask[md_atoms].sum() == 0 and batch.noise_mask[~md_atoms].any()
        trainer.model.eval()
        loss, grads = loss_and_grads_eval(trainer, batch)
    # DDP's objective is the mean of the rank losses (gradients are averaged)
    mean_rank_loss = sum(ranks["losses"]) / 2
    assert mean_rank_loss == pytest.approx(float(loss), rel=LOSS_REL)
    assert grads.keys() == ranks["grads"].keys()
    for name, grad in grads.items():  # averaged over ranks: another summation order
        assert_ulps(ranks["grads"][name], grad, GRADIENT_ULPS, what=name)


def test_fairchem_local_launcher_with_two_cpu_ranks(emt_data, tmp_path):
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--config-yml",
            str(QUICKSTART / "eqv2_dens_tiny.yml"),
            "--cpu",
            "--num-gpus",
            "2",
            "--run-dir",
            str(tmp_path),
            "--timestamp-id",
            "ddp",
            "--print-every",
            "1",
            *data_overrides(emt_data),
            "--optim.max_epochs=1",
            "--optim.eval_every=1000",
            "--optim.checkpoint_every=-1",
            "--optim.batch_size=3",
            f"{P}prob=1.0",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "denoising_pos_mae" in log
    # the epoch's corruption counts are summed over both ranks: every training structure (the
    # distributed sampler repeats one to even out the ranks), not one rank's half
    structures = len(read_lmdb(emt_data["train"]))
    counted = re.search(r"DeNS epoch 1: corrupted \d+/(\d+) structures", log)
    assert counted and structures <= int(counted.group(1)) <= structures + 1, log[-4000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "ddp" / "checkpoint.pt", weights_only=False, map_location="cpu")
    assert checkpoint["config"]["gpus"] == 0 and checkpoint["step"] > 0


def _metrics_worker(rank, world, port, emt_data, run_dir, result_path):
    import dataclasses

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    with fairchem_trainer(
        QUICKSTART / "eqv2_dens_tiny.yml", run_dir, *data_overrides(emt_data), "--num-gpus", str(world), f"{P}prob=1.0"
    ) as ctx:
        trainer = ctx.trainer
        # rank 0: every free atom corrupted (no clean atom counts); rank 1: partial corruption
        trainer.dens = dataclasses.replace(trainer.dens, corrupt_ratio=None if rank == 0 else 0.5)
        batch = global_batch("partial")
        assert trainer.corrupt(batch, step=1, rank=rank)
        trainer.model.eval()
        with torch.no_grad():
            out = trainer._forward(batch)
        local = trainer.denoising_metrics(out, batch, trainer.evaluator, {})
        aggregated = trainer.aggregate_denoising_metrics(local)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, {"local": local, "aggregated": aggregated})
        if rank == 0:
            torch.save(gathered, result_path)


def test_every_rank_reports_the_same_denoising_metrics(emt_data, tmp_path):
    result_path = tmp_path / "metrics.pt"
    mp.start_processes(
        _metrics_worker, args=(2, free_port(), emt_data, tmp_path / "ddp", result_path), nprocs=2, start_method="spawn"
    )
    ranks = torch.load(result_path, weights_only=False)
    assert "denoising_force_mae" not in ranks[0]["local"] and "denoising_force_mae" in ranks[1]["local"]
    keys = [list(r["aggregated"]) for r in ranks]
    assert keys[0] == keys[1] == ["denoising_energy_mae", "denoising_pos_mae", "denoising_force_mae"]
    for key in keys[0]:
        numel = sum(r["local"].get(key, {"numel": 0})["numel"] for r in ranks)
        total = sum(r["local"].get(key, {"total": 0.0})["total"] for r in ranks)
        for r in ranks:
            assert r["aggregated"][key]["numel"] == numel
            assert r["aggregated"][key]["metric"] == pytest.approx(total / numel, rel=LOSS_REL)
