"""Fixtures of the fairchem-2 integration's tests (run in the fairchem-2 environment).

Tiny EMT ``.aselmdb`` data, and one real ``fairchem -c`` DeNS training run through the
shipped config, shared by the tests that read its log, records and checkpoints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairchem_dens.fairchem2", exc_type=ImportError)

from fairchem_dens.fairchem2.emt_data import write_emt_aselmdb  # noqa: E402
from fairchem_dens.resources import configs_dir  # noqa: E402

HERE = Path(__file__).parent
FAIRCHEM = Path(sys.executable).with_name("fairchem")
DIRECT_CONFIG = configs_dir() / "fairchem2" / "dens_escnmd_direct.yml"


def fairchem_env() -> dict[str, str]:
    """Environment of a CLI subprocess: this folder importable (recording_unit), one thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_fairchem(config: Path, overrides: list[str], log: Path, timeout: int = 240) -> str:
    """``fairchem -c config overrides...`` in a subprocess; returns its log, fails the test on a non-zero exit."""
    with open(log, "w") as out:
        result = subprocess.run([str(FAIRCHEM), "-c", str(config), *overrides], stdout=out,
                                stderr=subprocess.STDOUT, env=fairchem_env(), timeout=timeout)
    text = log.read_text()
    assert result.returncode == 0, f"fairchem exited with {result.returncode}:\n{text[-4000:]}"
    return text


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


FINETUNE_CONFIG = configs_dir() / "fairchem2" / "dens_escnmd_conservative_finetune.yml"
UMA_CONFIG = configs_dir() / "fairchem2" / "dens_uma_finetune.yml"


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
    from test_finetune import uma_shaped

    run_dir = tmp_path_factory.mktemp("uma_run")
    _, checkpoint = uma_shaped(run_dir)
    overrides = [f"data_root={emt_root}", f"checkpoint={checkpoint}", "dataset_name=emt", "max_neighbors=20",
                 f"+job.run_dir={run_dir}", "+job.timestamp_id=uma"]
    log = run_fairchem(UMA_CONFIG, overrides, run_dir / "fairchem.log")
    return {"dir": run_dir / "uma", "log": log}
