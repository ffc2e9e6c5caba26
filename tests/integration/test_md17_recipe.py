"""The MD17 recipes at tiny size: convert with the CLI, train a few steps, metrics in meV."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

from fairchem_dens.models.checkpoints import read_checkpoint
from fairchem_dens.quickstart import fairchem_command

from helpers import CONFIGS, emt_md17_frames, write_md17_npz

TINY_EQV2 = [
    "--model.backbone.num_layers=2",
    "--model.backbone.sphere_channels=16",
    "--model.backbone.attn_hidden_channels=16",
    "--model.backbone.num_heads=2",
    "--model.backbone.attn_alpha_channels=8",
    "--model.backbone.attn_value_channels=4",
    "--model.backbone.ffn_hidden_channels=16",
    "--model.backbone.grid_resolution=8",
    "--model.backbone.edge_channels=16",
    "--model.backbone.num_distance_basis=64",
]
TINY_ESCN = [
    "--model.backbone.num_layers=2",
    "--model.backbone.sphere_channels=16",
    "--model.backbone.hidden_channels=16",
    "--model.backbone.edge_channels=16",
    "--model.backbone.num_sphere_samples=16",
]


@pytest.fixture(scope="module")
def md17_lmdb(tmp_path_factory):
    """A small MD17-format file (ethanol-like C2H6O... EMT knows H, C, N, O) converted by the CLI."""
    folder = tmp_path_factory.mktemp("md17")
    source = write_md17_npz(folder / "methanol.npz", emt_md17_frames("CH3OH", 60, 0.04))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "md17-to-lmdb",
            str(source),
            str(folder / "lmdb"),
            "--train",
            "40",
            "--val",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return folder / "lmdb"


@pytest.mark.parametrize(
    ("config", "tiny"),
    [
        ("equiformer_v2/lmax2/aspirin.yml", TINY_EQV2),
        ("equiformer_v2/lmax3/toluene.yml", TINY_EQV2),
        ("escn/uracil.yml", TINY_ESCN),
        ("esen/xtb_small_data_conservative.yml", []),  # gradient forces + noise head, already tiny
        ("esen/paper_md17_conservative.yml", []),  # the same with a whole eSEN block as its noise head
    ],
)
def test_md17_recipe_trains(md17_lmdb, tmp_path, config, tiny):
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--config-yml",
            str(CONFIGS / "md17" / config),
            "--cpu",
            "--run-dir",
            str(tmp_path),
            "--timestamp-id",
            "md17",
            "--print-every",
            "2",
            f"--dataset.train.src={md17_lmdb / 'train'}",
            f"--dataset.val.src={md17_lmdb / 'val'}",
            f"--dataset.test.src={md17_lmdb / 'test'}",
            "--optim.max_epochs=2",
            "--optim.num_workers=0",
            "--optim.scheduler_params.warmup_epochs=1",
            "--optim.denoising_pos_params.prob=0.5",
            *tiny,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert re.search(r"denoising_pos_mae: \d", log)  # per-structure DeNS happened ...
    assert re.search(r"denoising_force_mae: \d", log)  # ... in batches that also held clean atoms
    assert re.search(r"(?<![a-z_])forces_mae: \d", log)  # and plain S2EF metrics (validation)
    assert "val (meV units): energy_mae:" in log and "meV/Å" in log


def test_md17_two_step_recipe(md17_lmdb, tmp_path):
    """Step 1 (direct eSEN with DeNS) -> to-conservative -> step 2 (conservative, DeNS off), as the headers say."""
    data = [
        f"--dataset.train.src={md17_lmdb / 'train'}",
        f"--dataset.val.src={md17_lmdb / 'val'}",
        f"--dataset.test.src={md17_lmdb / 'test'}",
        "--optim.num_workers=0",
        "--optim.scheduler_params.warmup_epochs=1",
        "--print-every",
        "2",
    ]

    def train(config, run_id, *more):
        result = subprocess.run(
            [
                *fairchem_command(),
                "--mode",
                "train",
                "--config-yml",
                str(CONFIGS / "md17" / "esen" / config),
                "--cpu",
                "--run-dir",
                str(tmp_path),
                "--timestamp-id",
                run_id,
                *data,
                *more,
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=900,
        )
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
        return log

    step1 = train("xtb_small_data_direct.yml", "step1", "--optim.max_epochs=2", "--optim.denoising_pos_params.prob=0.5")
    assert re.search(r"denoising_pos_mae: \d", step1) and "DeNS epoch 1: corrupted" in step1
    start = tmp_path / "step2_start.pt"
    converted = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "to-conservative",
            str(tmp_path / "checkpoints" / "step1" / "checkpoint.pt"),
            str(start),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    step2 = train(
        "xtb_small_data_two_step_conservative.yml", "step2", "--optim.max_epochs=1", "--checkpoint", str(start)
    )
    after_load = step2.split("Loading checkpoint")[-1]
    assert "DeNS epoch" not in after_load and "denoising_pos_mae" not in after_load
    assert "val (meV units): energy_mae:" in after_load
    final = read_checkpoint(tmp_path / "checkpoints" / "step2" / "checkpoint.pt")
    assert final["config"]["model"]["heads"]["energy"]["module"].endswith("esen.MLP_EFS_Head")
    assert final["normalizers"]["forces"]["rmsd"].item() == final["normalizers"]["energy"]["rmsd"].item()
    assert final["step"] > 0


def _train(md17_lmdb, run_dir, *overrides):
    return subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--config-yml",
            str(CONFIGS / "md17" / "esen" / "paper_md17_conservative.yml"),
            "--cpu",
            "--run-dir",
            str(run_dir),
            "--timestamp-id",
            "kept",
            f"--dataset.train.src={md17_lmdb / 'train'}",
            f"--dataset.val.src={md17_lmdb / 'val'}",
            f"--dataset.test.src={md17_lmdb / 'test'}",
            "--optim.max_epochs=3",
            "--optim.num_workers=0",
            "--optim.scheduler_params.warmup_epochs=1",
            "--optim.eval_every=5",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=run_dir,
        timeout=900,
    )


def test_keep_checkpoint_epochs_keeps_the_weights_of_those_epochs(md17_lmdb, tmp_path):
    # 40 frames, batch 8: 5 steps an epoch, a checkpoint every epoch
    result = _train(md17_lmdb, tmp_path, "--optim.checkpoint_every=5", "--optim.keep_checkpoint_epochs=[1,3]")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    folder = tmp_path / "checkpoints" / "kept"
    kept = sorted(p.name for p in folder.glob("checkpoint_epoch_*.pt"))
    assert kept == ["checkpoint_epoch_1.pt", "checkpoint_epoch_3.pt"]
    first, last, final = (read_checkpoint(folder / name) for name in (*kept, "checkpoint.pt"))
    assert (first["epoch"], first["step"], last["step"]) == (1, 5, 15)
    assert all(torch.equal(last["state_dict"][k], final["state_dict"][k]) for k in final["state_dict"])
    assert any(not torch.equal(first["state_dict"][k], final["state_dict"][k]) for k in final["state_dict"])


def test_keep_checkpoint_epochs_where_no_checkpoint_is_saved_is_refused_before_training(md17_lmdb, tmp_path):
    result = _train(md17_lmdb, tmp_path, "--optim.checkpoint_every=10", "--optim.keep_checkpoint_epochs=[1,3]")
    assert result.returncode != 0
    assert (
        "keep_checkpoint_epochs: epoch 1 ends at step 5, where no checkpoint is saved" in result.stderr + result.stdout
    )
    assert not list(tmp_path.rglob("*.pt"))


def test_schedule_epochs_trains_the_first_epochs_of_a_longer_schedule(md17_lmdb, tmp_path):
    """3 epochs of a 1500-epoch cosine schedule end near its peak; 3 epochs of a 3-epoch one near its floor."""
    rates = {}
    for length in (1500, 3):
        folder = tmp_path / str(length)
        folder.mkdir()
        result = _train(md17_lmdb, folder, "--optim.checkpoint_every=5", f"--optim.schedule_epochs={length}")
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        checkpoint = read_checkpoint(folder / "checkpoints" / "kept" / "checkpoint.pt")
        rates[length] = checkpoint["optimizer"]["param_groups"][0]["lr"]

    def cosine(step: int, total: int) -> float:  # fairchem's factor after the warm-up (5 steps here)
        return 0.002 + 0.5 * (1 - 0.002) * (1 + math.cos(math.pi * step / total))

    # 5 steps an epoch; the 15th and last step trains with the factor of 14 steps done
    assert rates[1500] == pytest.approx(5e-4 * cosine(14, 1500 * 5), rel=1e-9)
    assert rates[3] == pytest.approx(5e-4 * cosine(14, 3 * 5), rel=1e-9)
    assert rates[1500] > 50 * rates[3]


def test_schedule_epochs_shorter_than_the_run_is_refused_before_anything_is_written(md17_lmdb, tmp_path):
    result = _train(md17_lmdb, tmp_path, "--optim.schedule_epochs=2")
    assert result.returncode != 0
    assert "optim.schedule_epochs (the length of the learning-rate and denoising-weight schedules)" in (
        result.stdout + result.stderr
    )
    assert not list(tmp_path.rglob("*.pt"))
