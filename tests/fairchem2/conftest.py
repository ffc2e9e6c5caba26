"""Fixtures of the fairchem-2 integration's tests (run in the fairchem-2 environment).

Tiny EMT ``.aselmdb`` data and the real ``fairchem -c`` runs of the shipped configs (direct
pre-training, conservative fine-tuning from it, UMA fine-tuning), shared by the tests that read
their logs, records and checkpoints. Helpers that are not fixtures are in fc2_helpers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairchem_dens.fairchem2", exc_type=ImportError)

from fairchem_dens.fairchem2.emt_data import write_emt_aselmdb  # noqa: E402

from fc2_helpers import DIRECT_CONFIG, FINETUNE_CONFIG, MD17_CONFIG, UMA_CONFIG, run_fairchem, uma_shaped  # noqa: E402


@pytest.fixture(scope="session")
def emt_root(tmp_path_factory) -> Path:
    return write_emt_aselmdb(tmp_path_factory.mktemp("emt2"))


@pytest.fixture(scope="session")
def direct_run(emt_root, tmp_path_factory):
    """The shipped direct DeNS config trained for 2 epochs by the CLI, with the recording unit."""
    run_dir = tmp_path_factory.mktemp("direct_run")
    overrides = [
        f"data_root={emt_root}",
        f"+job.run_dir={run_dir}",
        "+job.timestamp_id=t1",
        "runner.train_eval_unit._target_=recording_unit.RecordingUnit",
        f"+runner.train_eval_unit.record_dir={run_dir}/records",
    ]
    log = run_fairchem(DIRECT_CONFIG, overrides, run_dir / "fairchem.log")
    return {"dir": run_dir / "t1", "log": log, "records": run_dir / "records"}


@pytest.fixture(scope="session")
def finetune_run(direct_run, emt_root, tmp_path_factory):
    """The shipped conservative DeNS fine-tuning config, from the direct run's inference checkpoint."""
    run_dir = tmp_path_factory.mktemp("finetune_run")
    checkpoint = direct_run["dir"] / "checkpoints" / "final" / "inference_ckpt.pt"
    overrides = [f"data_root={emt_root}", f"checkpoint={checkpoint}", f"+job.run_dir={run_dir}", "+job.timestamp_id=ft"]
    log = run_fairchem(FINETUNE_CONFIG, overrides, run_dir / "fairchem.log")
    return {"dir": run_dir / "ft", "log": log, "checkpoint": checkpoint}


@pytest.fixture(scope="session")
def uma_run(emt_root, tmp_path_factory):
    """The shipped UMA fine-tuning config on a tiny 2-expert UMA-shaped checkpoint in fairchem 2's format."""
    run_dir = tmp_path_factory.mktemp("uma_run")
    _, checkpoint = uma_shaped(run_dir)
    overrides = [
        f"data_root={emt_root}",
        f"checkpoint={checkpoint}",
        "dataset_name=emt",
        "max_neighbors=20",
        f"+job.run_dir={run_dir}",
        "+job.timestamp_id=uma",
    ]
    log = run_fairchem(UMA_CONFIG, overrides, run_dir / "fairchem.log")
    return {"dir": run_dir / "uma", "log": log}


@pytest.fixture(scope="session")
def md17_run(tmp_path_factory):
    """The shipped MD17 recipe (conservative, block noise head) by the CLI on .aselmdb data that
    ``fairchem-dens md17-to-lmdb --aselmdb`` made from a small MD17-format file (EMT methanol)."""
    from helpers import emt_md17_frames, write_md17_npz

    folder = tmp_path_factory.mktemp("md17_run")
    write_md17_npz(folder / "methanol.npz", emt_md17_frames("CH3OH", 60, 0.04))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "md17-to-lmdb",
            str(folder / "methanol.npz"),
            str(folder / "data"),
            "--train",
            "40",
            "--val",
            "8",
            "--aselmdb",
        ],
        check=True,
        capture_output=True,
    )
    statistics = json.loads((folder / "data" / "md17_info.json").read_text())["train_statistics"]
    overrides = [
        f"data_root={folder / 'data'}",
        f"energy_mean={statistics['energy_mean']}",
        f"energy_std={statistics['energy_std']}",
        "max_epochs=2",
        "max_atoms=48",
        "runner.train_eval_unit.dens.denoising_pos_params.prob=0.5",
        f"+job.run_dir={folder}",
        "+job.timestamp_id=md17",
    ]
    log = run_fairchem(MD17_CONFIG, overrides, folder / "fairchem.log")
    return {"dir": folder / "md17", "log": log}
