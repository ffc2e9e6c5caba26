"""Nothing lost at the end of a run or in a save that is killed half-way."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fairchem_dens.models.checkpoints import read_checkpoint
from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.testing import fairchem_trainer
from fairchem_dens.testing.tolerances import F64_REL

from helpers import QUICKSTART, data_overrides

NO_CHECKPOINTS = ["--optim.max_epochs=1", "--optim.eval_every=100000", "--optim.checkpoint_every=100000"]

# Runs fairchem's CLI with torch.save replaced for the N-th `checkpoint.pt` save: that save
# writes a few bytes, says so, and hangs until the test kills the process (SIGKILL, as a
# SLURM time limit or the OOM killer would).
HANGING_SAVE = """
import os, sys, time
from pathlib import Path
import torch

real_save, calls = torch.save, []

def save(obj, f, *args, **kwargs):
    name = os.path.basename(str(f))
    if "checkpoint.pt" in name and not name.startswith(("best", ".best")):
        calls.append(name)
        if len(calls) == int(os.environ["HANG_AT_SAVE"]):
            with open(f, "wb") as handle:
                handle.write(b"PK\\x03\\x04 half a checkpoint")
                handle.flush()
                os.fsync(handle.fileno())
            Path(os.environ["HANG_FLAG"]).write_text(str(f))
            time.sleep(600)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
from fairchem.core._cli import main
sys.argv = ["fairchem", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("config", "final_checkpoint"), [("eqv2_dens_tiny.yml", True), ("eqv2_tiny.yml", False)])
def test_a_final_checkpoint_is_always_written(emt_data, tmp_path, caplog, config, final_checkpoint):
    # eval_every/checkpoint_every longer than the run: fairchem's own trainer saves nothing (fairchem#1073)
    with (
        caplog.at_level(logging.INFO),
        fairchem_trainer(QUICKSTART / config, tmp_path, *data_overrides(emt_data), *NO_CHECKPOINTS) as ctx,
    ):
        ctx.task.setup(ctx.trainer)
        ctx.task.run()
        steps = ctx.trainer.step
    path = tmp_path / "checkpoints" / "test" / "checkpoint.pt"
    assert path.exists() == final_checkpoint
    if final_checkpoint:
        assert "no intermediate checkpoint will be written" in caplog.text
        assert read_checkpoint(path)["step"] == steps == len(ctx.trainer.train_loader)


def run_until_hanging_save(tmp_path, config, emt_data, hang_at):
    flag = tmp_path / "hanging"
    script = tmp_path / "hanging_save.py"
    script.write_text(HANGING_SAVE)
    env = {**os.environ, "HANG_AT_SAVE": str(hang_at), "HANG_FLAG": str(flag)}
    process = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "--mode",
            "train",
            "--config-yml",
            str(QUICKSTART / config),
            "--cpu",
            "--run-dir",
            str(tmp_path),
            "--timestamp-id",
            "run",
            *data_overrides(emt_data),
            "--optim.max_epochs=1",
            "--optim.eval_every=100000",
            "--optim.checkpoint_every=1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not flag.exists():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the run never reached save {hang_at}:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return tmp_path / "checkpoints" / "run" / "checkpoint.pt"


def test_a_save_killed_half_way_leaves_the_last_checkpoint_and_the_run_resumes(emt_data, tmp_path):
    checkpoint = run_until_hanging_save(tmp_path, "eqv2_dens_tiny.yml", emt_data, hang_at=3)
    assert read_checkpoint(checkpoint)["step"] == 2  # the save of step 3 was killed; step 2's is intact
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
            "resumed",
            *data_overrides(emt_data),
            "--optim.max_epochs=1",
            "--optim.eval_every=100000",
            "--checkpoint",
            str(checkpoint),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"Loading checkpoint from: {checkpoint}" in result.stdout + result.stderr
    resumed = read_checkpoint(tmp_path / "checkpoints" / "resumed" / "checkpoint.pt")
    assert resumed["step"] > 2 and resumed["epoch"] == pytest.approx(1.0, rel=F64_REL)


def test_fairchems_own_save_killed_half_way_leaves_a_truncated_checkpoint(emt_data, tmp_path):
    # what the atomic save protects against: fairchem writes checkpoint.pt in place
    checkpoint = run_until_hanging_save(tmp_path, "eqv2_tiny.yml", emt_data, hang_at=3)
    with pytest.raises(Exception):
        torch.load(checkpoint, weights_only=True)
