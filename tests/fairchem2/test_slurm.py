"""fairchem 2's own SLURM launch trains a DeNS run, and a preempted run resumes where it was.

``fairchem -c dens_escnmd_direct.yml job.scheduler.mode=SLURM ...`` submits through submitit to a
REAL one-node SLURM (fairchem_dens.testing.slurm_cluster). A job preempted with SIGUSR2 is
requeued by submitit and resumes from fairchem's last saved checkpoint: the steps since it are
redone, with the same DeNS draws (the corruption of step s depends on the seed and s only), so
every epoch's tally of corrupted structures and the step count equal an uninterrupted run's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fairchem_dens.testing.slurm_cluster import (
    describe,
    job_logs,
    local_cluster,
    push_requeued,
    wait_for_end,
    wait_until,
)

from fc2_helpers import DIRECT_CONFIG, FAIRCHEM, fairchem_env

pytestmark = pytest.mark.slurm

EPOCHS = 12  # of 4 steps on the tiny EMT data: long enough to be preempted while it trains
TALLY = re.compile(r"DeNS epoch (\d+): corrupted (\d+/\d+ structures.*)$", re.MULTILINE)
STEP = re.compile(r"^INFO:root:\{'train/loss'", re.MULTILINE)


@pytest.fixture(scope="module")
def partition():
    with local_cluster() as name:
        yield name


def submit(tmp: Path, emt_root: Path, partition: str, name: str) -> SimpleNamespace:
    """`fairchem -c` of the shipped direct DeNS config in SLURM mode, a checkpoint every epoch."""
    overrides = [
        f"data_root={emt_root}",
        "job.scheduler.mode=SLURM",
        f"+job.scheduler.slurm.partition={partition}",
        "+job.scheduler.slurm.mem_gb=2",
        "+job.scheduler.slurm.cpus_per_task=1",
        "+job.scheduler.slurm.timeout_hr=1",
        f"max_epochs={EPOCHS}",
        "checkpoint_every=4",
        f"+job.run_dir={tmp}",
        f"+job.timestamp_id={name}",
    ]
    result = subprocess.run(
        [str(FAIRCHEM), "-c", str(DIRECT_CONFIG), *overrides],
        capture_output=True,
        text=True,
        env=fairchem_env(),
        cwd=tmp,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    match = re.search(r"slurm id: (\d+)", output)
    assert match, output[-4000:]
    return SimpleNamespace(id=match.group(1), folder=tmp / name / "logs", run_dir=tmp / name, output=output)


def tallies(log: str) -> dict[int, str]:
    return {int(epoch): tally for epoch, tally in TALLY.findall(log)}


@pytest.fixture(scope="module")
def uninterrupted(partition, emt_root, tmp_path_factory) -> SimpleNamespace:
    job = submit(tmp_path_factory.mktemp("slurm2_reference"), emt_root, partition, "reference")
    wait_for_end(job)
    job.log = job_logs(job.folder, job.id)
    return job


def test_a_dens_run_trains_through_fairchems_slurm_launch(uninterrupted):
    job = uninterrupted
    assert sorted(tallies(job.log)) == list(range(1, EPOCHS + 1)), describe(job)
    assert len(STEP.findall(job.log)) == 4 * EPOCHS, describe(job)
    assert (job.run_dir / "checkpoints" / "final" / "inference_ckpt.pt").is_file(), describe(job)


def test_a_preempted_run_is_requeued_and_resumes_with_the_same_draws(uninterrupted, partition, emt_root, tmp_path):
    job = submit(tmp_path, emt_root, partition, "preempted")
    wait_until(
        "epoch 3's tally in the log", lambda: 3 in tallies(job_logs(job.folder, job.id)), job, timeout=300, every=0.2
    )
    subprocess.run(["scancel", "--signal=USR2", job.id], check=True, timeout=30)
    push_requeued(job)
    wait_for_end(job)
    log = job_logs(job.folder, job.id)
    assert "Submitit checkpointing callback is completed" in log, describe(job)
    # the requeued job: epochs since the last checkpoint redone, every epoch's draws as uninterrupted
    resumed = log[log.index("Submitit checkpointing callback is completed") :]
    assert tallies(resumed), describe(job)
    assert tallies(log) == tallies(uninterrupted.log), describe(job)
    assert max(tallies(resumed)) == EPOCHS and min(tallies(resumed)) > 1, describe(job)
    # no step lost: the steps trained after the resume complete the run from its checkpoint
    redone_from = min(tallies(resumed)) - 1  # the checkpoint's epoch
    assert len(STEP.findall(resumed)) == 4 * (EPOCHS - redone_from), describe(job)
    assert (job.run_dir / "checkpoints" / "final" / "inference_ckpt.pt").is_file(), describe(job)
