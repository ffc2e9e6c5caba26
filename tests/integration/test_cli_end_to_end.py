"""`fairchem --mode train` then `--mode predict` with a DeNS config, in real subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fairchem.core.datasets import LmdbDataset

from fairchem_dens.quickstart import fairchem_command

from helpers import QUICKSTART, data_overrides


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run([*fairchem_command(), *args], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_train_then_predict(emt_data, tmp_path):
    common = [
        "--config-yml",
        str(QUICKSTART / "eqv2_dens_tiny.yml"),
        "--cpu",
        "--run-dir",
        str(tmp_path),
        *data_overrides(emt_data),
    ]
    log = run(
        [
            "--mode",
            "train",
            "--timestamp-id",
            "e2e",
            "--print-every",
            "1",
            "--optim.max_epochs=1",
            "--optim.eval_every=1000",
            "--optim.denoising_pos_params.prob=0.5",
            *common,
        ],
        tmp_path,
    )
    # DeNS and plain steps both happened and were logged with fairchem's metrics
    assert "denoising_pos_mae" in log and "forces_mae" in log
    checkpoint = tmp_path / "checkpoints" / "e2e" / "checkpoint.pt"
    assert checkpoint.exists()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["config"]["trainer"] == "forces"
    assert "denoising_pos_target" in saved["normalizers"]
    assert any(
        k.endswith("denoising_pos_block.proj.fc.weight") or "denoising_pos_block" in k for k in saved["state_dict"]
    )

    run(["--mode", "predict", "--timestamp-id", "pred", "--checkpoint", str(checkpoint), *common], tmp_path)
    predictions = tmp_path / "results" / "pred" / "s2ef_predictions.npz"
    assert predictions.exists()
    test = LmdbDataset({"src": str(emt_data["test"])})
    expected_ids = sorted(f"{int(d.sid)}_{int(d.fid)}" for d in (test[i] for i in range(len(test))))
    free_atoms = {f"{int(d.sid)}_{int(d.fid)}": int((d.fixed == 0).sum()) for d in (test[i] for i in range(len(test)))}
    with np.load(predictions) as npz:
        assert npz["ids"].dtype.kind == "U" and npz["forces"].dtype != object
        ids = npz["ids"].tolist()
        assert ids == expected_ids  # every frame once, sorted like fairchem's writer sorts
        assert npz["energy"].shape == (len(ids),) and npz["energy"].dtype == np.float32
        forces = np.split(npz["forces"], npz["chunk_idx"])
        assert npz["forces"].shape[1] == 3
        assert [len(f) for f in forces] == [free_atoms[i] for i in ids]  # free atoms only
        assert np.isfinite(npz["forces"]).all() and np.isfinite(npz["energy"]).all()

    # ... and into a leaderboard file (the same predictions stand in for all four splits)
    submission = tmp_path / "submission.npz"
    splits = [arg for split in ("id", "ood-ads", "ood-cat", "ood-both") for arg in (f"--{split}", str(predictions))]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "make-submission",
            "s2ef",
            *splits,
            "--out",
            str(submission),
            "--checkpoint",
            str(checkpoint),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(submission, allow_pickle=False) as npz:
        assert {"id_ids", "ood_both_forces", "ood_cat_chunk_idx", "ood_ads_energy"} <= set(npz.files)
        assert npz["id_energy"].ndim == 1
    assert (tmp_path / "submission.npz.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "--optim.denoising_pos_params.prob=1.5",
            "optim.denoising_pos_params.prob must be a probability in [0, 1], got 1.5",
        ),
        # a misspelt DeNS key would otherwise train to the end with the recipe's values
        (
            "--optim.denoising_pos_parmas.prob=0.5",
            "unknown DeNS key optim.denoising_pos_parmas (nearest known key: optim.denoising_pos_params)",
        ),
        (
            "--optim.denoising_pos_params.corupt_ratio=0.5",
            "unknown DeNS key optim.denoising_pos_params.corupt_ratio (nearest known key: "
            "optim.denoising_pos_params.corrupt_ratio)",
        ),
    ],
)
def test_bad_dens_config_fails_before_training(emt_data, tmp_path, override, message):
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--config-yml",
            str(QUICKSTART / "eqv2_dens_tiny.yml"),
            "--cpu",
            "--run-dir",
            str(tmp_path),
            "--timestamp-id",
            "bad",
            *data_overrides(emt_data),
            override,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "checkpoints" / "bad").exists()


def test_fairchem_dens_cli_help():
    result = subprocess.run([sys.executable, "-m", "fairchem_dens.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "quickstart" in result.stdout


def test_quickstart_command_at_tiny_size(tmp_path):
    """`fairchem-dens quickstart` as users run it (shipped xTB data, both variants, two runs at a time)."""
    import json
    import re

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "quickstart",
            "--workdir",
            str(tmp_path / "qs"),
            "--epochs",
            "5",
            "--frames",
            "8",
            "--seeds",
            "0",
            "--jobs",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert re.search(r"DeNS / plain = \d\.\d{3} \(per seed \d\.\d{3}\); energy DeNS / plain = \d\.\d{3}", out)
    assert re.search(r"learned nothing +\d+\.\d +\d+\.\d", out)  # the null model's errors, for scale
    assert re.search(r"\[dens seed 0 +\d+s\] epoch +5\.0 +validation F MAE", out)  # progress is echoed
    summary = json.loads((tmp_path / "qs" / "quickstart_results.json").read_text())
    for variant in ("plain", "dens"):
        run_ = summary[f"{variant}-seed0"]
        assert 0 < run_["test_force_meV_per_A"] < 5000 and 0 < run_["test_energy_meV"] < 5000
        assert run_["val_force"][-1][0] == 5.0  # validated after epoch 5
    # the DeNS run denoised, the plain one did not; each trained on the first 8 of 950 frames
    dens_log = (tmp_path / "qs" / "runs" / "dens-seed0" / "train.log").read_text()
    plain_log = (tmp_path / "qs" / "runs" / "plain-seed0" / "train.log").read_text()
    assert "denoising_pos_mae" in dens_log and "denoising_pos_mae" not in plain_log
    info = json.loads((tmp_path / "qs" / "data" / "md17_info.json").read_text())
    assert info["split_sizes"] == {"train": 950, "val": 50, "test": 500}
    assert (tmp_path / "qs" / "validation_curves.png").stat().st_size > 0
    # the null model: zero forces score the mean |F| of the 500 test frames, a few hundred meV/Å here
    assert 100 < summary["learned_nothing"]["force_meV_per_A"] < 5000 and summary["learned_nothing"]["energy_meV"] > 0


def test_quickstart_refuses_sizes_the_example_does_not_hold(tmp_path):
    for args, message in (
        (["--frames", "951"], "--frames must be at least 1 and at most 950, got 951"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--seeds", "0", "0"], "--seeds must name one or more different seeds"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "fairchem_dens.cli", "quickstart", "--workdir", str(tmp_path / "qs"), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "qs").exists()  # refused before anything was written


def test_quickstart_refuses_a_data_folder_that_is_not_its_own(tmp_path):
    """The EMT example written into the quickstart's folder is kept, and the refusal says what to do."""
    cli = [sys.executable, "-m", "fairchem_dens.cli"]
    data = tmp_path / "qs" / "data"
    made = subprocess.run([*cli, "make-emt-data", str(data)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    result = subprocess.run(
        [*cli, "quickstart", "--workdir", str(tmp_path / "qs"), "--epochs", "1", "--frames", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"fairchem-dens quickstart: {data} exists but is not the quickstart's data (no md17_info.json): "
        "choose another --workdir, or move that folder away"
    ]
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    empty = tmp_path / "qs_empty" / "data"  # an empty folder is refused the same way, not with a traceback
    empty.mkdir(parents=True)
    result = subprocess.run(
        [*cli, "quickstart", "--workdir", str(empty.parent), "--epochs", "1", "--frames", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "exists but is not the quickstart's data" in result.stderr, result.stderr[-2000:]
