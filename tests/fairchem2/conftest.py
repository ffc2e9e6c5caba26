"""Fixtures of the fairchem-2 integration's tests (run in the fairchem-2 environment).

Tiny EMT ``.aselmdb`` data and the real ``fairchem -c`` runs of the shipped configs (direct
pre-training, conservative fine-tuning from it, UMA fine-tuning), shared by the tests that read
their logs, records and checkpoints. Helpers that are not fixtures are in fc2_helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fairchem_dens.fairchem2", exc_type=ImportError)

from fairchem_dens.fairchem2.emt_data import write_emt_aselmdb  # noqa: E402
from fc2_helpers import DIRECT_CONFIG, FINETUNE_CONFIG, UMA_CONFIG, run_fairchem, uma_shaped  # noqa: E402


@pytest.fixture(scope="session")
def emt_root(tmp_path_factory) -> Path:
    return write_emt_aselmdb(tmp_path_factory.mktemp("emt2"))


@pytest.fixture(scope="session")
def direct_run(emt_root, tmp_path_factory):
    """The shipped direct DeNS config trained for 2 epochs by the CLI, with the recording unit."""
    run_dir = tmp_path_factory.mktemp("direct_run")
    overrides = [
        f"data_root={emt_root}", f"+job.run_dir={run_dir}", "+job.timestamp_id=t1",
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
    overrides = [f"data_root={emt_root}", f"checkpoint={checkpoint}", f"+job.run_dir={run_dir}",
                 "+job.timestamp_id=ft"]
    log = run_fairchem(FINETUNE_CONFIG, overrides, run_dir / "fairchem.log")
    return {"dir": run_dir / "ft", "log": log}


@pytest.fixture(scope="session")
def uma_run(emt_root, tmp_path_factory):
    """The shipped UMA fine-tuning config on a tiny 2-expert UMA-shaped checkpoint in fairchem 2's format."""
    run_dir = tmp_path_factory.mktemp("uma_run")
    _, checkpoint = uma_shaped(run_dir)
    overrides = [f"data_root={emt_root}", f"checkpoint={checkpoint}", "dataset_name=emt", "max_neighbors=20",
                 f"+job.run_dir={run_dir}", "+job.timestamp_id=uma"]
    log = run_fairchem(UMA_CONFIG, overrides, run_dir / "fairchem.log")
    return {"dir": run_dir / "uma", "log": log}
