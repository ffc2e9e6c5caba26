"""`fairchem-dens submit`: DeNS training through submitit and a REAL one-node SLURM.

The tests marked ``slurm`` start the cluster with scripts/slurm_local_up.sh (root
and apt needed: Debian's slurm-wlm and munge are installed when missing), stop
it with scripts/slurm_local_down.sh, and fail, never skip, when it cannot start.
The other tests check the refusals of `fairchem-dens submit` without SLURM and
the preemption logic without a cluster.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fairchem_dens import cli
from fairchem_dens import slurm as dens_slurm
from fairchem_dens.testing.slurm_cluster import (
    PARTITION,
    describe,
    job_logs,
    local_cluster,
    push_requeued,
    wait_for_end,
    wait_until,
)
from fairchem_dens.testing.tolerances import F64_REL, RESUMED_RUN_LOSS_REL

from helpers import QUICKSTART, data_overrides

CLI = Path(sys.executable).parent / "fairchem-dens"
# The training both slurm tests run: 8 epochs of batch size 1 (a few hundred
# steps of ~0.05 s), long enough to be preempted while it trains.
EPOCHS, BATCH = 8, 1
TRAIN_LINE = re.compile(r"loss: (?P<loss>\S+), lr: (?P<lr>\S+), epoch: (?P<epoch>\S+), step: (?P<step>\S+)$")
PREEMPTED = re.compile(r"fairchem_dens\.slurm: preempted; saved step (?P<step>\d+) \(epoch (?P<epoch>[0-9.]+)\)")


# --------------------------------------------------------------------- cluster
@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster, up for the session; its partition name."""
    with local_cluster() as partition:
        yield partition


def submit_training(
    tmp: Path, emt_data, name: str, *extra: str, ranks: int = 1, epochs: int = EPOCHS, batch: int = BATCH
) -> SimpleNamespace:
    """`python -m fairchem_dens.slurm` (= `fairchem-dens submit`) of a tiny DeNS training."""
    logdir, run_dir = tmp / "logs", tmp / "run"
    command = [
        sys.executable,
        "-m",
        "fairchem_dens.slurm",
        "--mode",
        "train",
        "--config-yml",
        str(QUICKSTART / "eqv2_dens_tiny.yml"),
        "--cpu",
        "--num-gpus",
        str(ranks),
        "--slurm-timeout",
        "1",
        "--slurm-partition",
        PARTITION,
        "--slurm-mem",
        "2",
        "--logdir",
        str(logdir),
        "--run-dir",
        str(run_dir),
        "--timestamp-id",
        name,
        "--identifier",
        name,
        "--print-every",
        "1",
        f"--optim.max_epochs={epochs}",
        f"--optim.batch_size={batch}",
        "--optim.eval_every=100000",
        "--optim.checkpoint_every=-1",
        *data_overrides(emt_data),
        *extra,
    ]
    result = subprocess.run(command, check=False, cwd=tmp, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    match = re.search(r"Submitted jobs: (\S+)", output)
    assert match, output[-4000:]
    job_id = match.group(1)
    return SimpleNamespace(
        id=job_id,
        folder=logdir / job_id,
        run_dir=run_dir,
        name=name,
        output=output,
        checkpoint=run_dir / "checkpoints" / name / "checkpoint.pt",
    )


def run_submit(cwd: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    """The installed `fairchem-dens submit ARGS`, run in ``cwd`` (with ``path`` as PATH if given)."""
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    return subprocess.run(
        [str(CLI), "submit", *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def processes_naming(text: str) -> list[str]:
    """Command lines of the running processes that contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in command:
            found.append(command)
    return found


def training_lines(log: str) -> list[dict]:
    """fairchem's per-step training lines (``--print-every 1``), in order."""
    lines = []
    for line in log.splitlines():
        match = TRAIN_LINE.search(line.strip())
        if match:
            lines.append(
                {
                    "step": round(float(match["step"])),
                    "epoch": match["epoch"],
                    "lr": match["lr"],
                    "loss": float(match["loss"]),
                }
            )
    return lines


def steps_per_epoch(emt_data, batch: int, ranks: int = 1) -> int:
    from fairchem.core.datasets import LmdbDataset

    frames = len(LmdbDataset({"src": str(emt_data["train"])}))
    return math.ceil(math.ceil(frames / ranks) / batch)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, emt_data, tmp_path_factory):
    """The reference: the DeNS training submitted and run to the end without interruption."""
    job = submit_training(tmp_path_factory.mktemp("slurm_ref"), emt_data, "reference")
    wait_for_end(job)
    job.log = job_logs(job.folder, job.id)
    return job


# --------------------------------------------------------------------- with SLURM
@pytest.mark.slurm
def test_submit_trains_on_cpu(uninterrupted, emt_data):
    job = uninterrupted
    total = EPOCHS * steps_per_epoch(emt_data, BATCH)
    assert job.checkpoint.exists(), describe(job)
    saved = load(job.checkpoint)
    assert saved["step"] == total and saved["epoch"] == EPOCHS, describe(job)
    assert saved["config"]["trainer"] == "forces" and "denoising_pos_target" in saved["normalizers"]
    # ran as a CPU job with gloo, on one task, with fairchem's training loop logging every step
    assert "fairchem_dens.slurm: CPU job: rank 0 of 1" in job.log, describe(job)
    assert [line["step"] for line in training_lines(job.log)] == list(range(1, total + 1)), describe(job)
    assert "denoising_pos_mae" in job.log and "Total time taken" in job.log
    # CPU request: no GPU asked for; fairchem's other requests kept
    script = (job.folder / f"{job.id}_submission.sh").read_text()
    assert "--gpus-per-node" not in script and "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH --mem=2GB" in script and "#SBATCH --signal=USR2@90" in script
    assert sorted(job.folder.parent.joinpath("exp").glob("*.log")), "no experiment log"
    assert f"Submitted jobs: {job.id} (SLURM; job logs in {job.folder.parent}/<job id>/)" in job.output
    # the job's folder and the experiment log, no literal "%j" folder (submitit links its sbatch script there too)
    assert sorted(p.name for p in job.folder.parent.iterdir() if not p.is_symlink()) == sorted([job.id, "exp"])


@pytest.mark.slurm
def test_preempted_job_resumes_without_losing_or_repeating_steps(uninterrupted, emt_data, tmp_path):
    total = EPOCHS * steps_per_epoch(emt_data, BATCH)
    job = submit_training(tmp_path, emt_data, "preempted")

    # Preempt it while it trains, as submitit's job._interrupt() does (SIGTERM, then USR2).
    wait_until(
        "3 training steps in the log",
        lambda: len(training_lines(job_logs(job.folder, job.id))) >= 3,
        job,
        timeout=240,
        every=0.2,
    )
    for sig in ("TERM", "USR2"):
        subprocess.run(["scancel", f"--signal={sig}", job.id], check=True, timeout=30)
    push_requeued(job)  # submitit requeues it; SLURM would hold it ~2 min
    wait_for_end(job)

    log = job_logs(job.folder, job.id)
    assert "this job is preempted" in log and f"Requeued job {job.id}" in log, describe(job)
    marker = PREEMPTED.search(log)
    assert marker, describe(job)
    saved_step = int(marker["step"])
    assert 0 < saved_step < total, f"preempted at step {saved_step} of {total}\n{describe(job)}"
    assert float(marker["epoch"]) == pytest.approx(saved_step / (total / EPOCHS), rel=F64_REL)
    before = training_lines(log[: marker.start()])
    after = training_lines(log[marker.end() :])
    # nothing repeated, nothing lost: the first job trained 1..S, the requeued one S+1..N
    assert [line["step"] for line in before] == list(range(1, saved_step + 1)), describe(job)
    assert [line["step"] for line in after] == list(range(saved_step + 1, total + 1)), describe(job)
    assert "load user specified checkpoint" in log[marker.end() :], describe(job)
    final = load(job.checkpoint)
    assert final["step"] == total and final["epoch"] == EPOCHS

    # ... and it is the uninterrupted run: same step count, epochs and learning rates at
    # every step, and the same losses right after the resume. (Not bit for bit:
    # EquiformerV2 draws its edge rotations from torch's global RNG, which fairchem
    # checkpoints do not hold, so later steps drift by float round-off.)
    reference = training_lines(uninterrupted.log)
    resumed = before + after
    assert [(r["step"], r["epoch"], r["lr"]) for r in resumed] == [(r["step"], r["epoch"], r["lr"]) for r in reference]
    for ours, theirs in zip(after[:3], reference[saved_step : saved_step + 3], strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=RESUMED_RUN_LOSS_REL), (ours, theirs)
    assert load(uninterrupted.checkpoint)["step"] == final["step"]


@pytest.mark.slurm
def test_two_cpu_ranks(slurm_cluster, emt_data, tmp_path):
    """--num-gpus 2 with --cpu: two gloo ranks (two SLURM tasks), ranks from the SLURM job."""
    job = submit_training(tmp_path, emt_data, "ddp", ranks=2, epochs=1, batch=2)
    wait_for_end(job)
    ranks = [job_logs(job.folder, job.id, task) for task in (0, 1)]
    assert "CPU job: rank 0 of 2 (local rank 0)" in ranks[0], describe(job)
    assert "CPU job: rank 1 of 2 (local rank 1)" in ranks[1], describe(job)
    assert load(job.checkpoint)["step"] == steps_per_epoch(emt_data, batch=2, ranks=2)
    assert "#SBATCH --ntasks-per-node=2" in (job.folder / f"{job.id}_submission.sh").read_text()


@pytest.mark.slurm
def test_failed_sbatch_is_one_line_and_leaves_nothing(slurm_cluster, tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    (logdir / "earlier.log").write_text("an earlier run's")
    result = run_submit(
        tmp_path,
        "--mode",
        "train",
        "--config-yml",
        str(QUICKSTART / "eqv2_dens_tiny.yml"),
        "--cpu",
        "--slurm-partition",
        "no_such_partition",
        "--slurm-mem",
        "2",
        "--slurm-timeout",
        "1",
        "--logdir",
        str(logdir),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()  # sbatch's own error, once
    assert line.startswith("fairchem-dens submit: sbatch failed, nothing was submitted: sbatch: error: "), line
    assert "invalid partition" in line.lower(), line
    assert "Submitted jobs" not in result.stdout
    # submitit's pickle and sbatch script are gone; what was there is kept
    assert [p.name for p in logdir.iterdir()] == ["earlier.log"]


SUBMIT_ARGS = [
    "--mode",
    "train",
    "--config-yml",
    str(QUICKSTART / "eqv2_dens_tiny.yml"),
    "--num-gpus",
    "2",
    "--num-nodes",
    "3",
    "--slurm-partition",
    "p",
    "--slurm-qos",
    "q",
    "--slurm-account",
    "a",
    "--slurm-mem",
    "7",
    "--slurm-timeout",
    "5",
    "--identifier",
    "x",
    "--optim.num_workers=3",
    "--slurm.constraint=volta",  # the `slurm:` pass-through, from the command line
]


def _requests(monkeypatch, module, call) -> dict:
    """What `call` (a submitting main) gives submitit, with AutoExecutor and the experiment log faked."""
    seen = {}

    class FakeExecutor:
        def __init__(self, folder, **kwargs):
            self.folder, self.parameters = folder, {}
            seen["executor"] = kwargs

        def update_parameters(self, **kwargs):
            seen["parameters"] = kwargs
            self.parameters.update(kwargs)

        def map_array(self, fn, configs):
            seen["runner"], seen["configs"] = fn, configs
            return [SimpleNamespace(job_id="1")]

    monkeypatch.setattr(module, "AutoExecutor", FakeExecutor)
    monkeypatch.setattr(module, "save_experiment_log", lambda *args: "exp.log")
    call()
    return seen


@pytest.mark.slurm
def test_gpu_request_is_fairchems(slurm_cluster, monkeypatch):
    """The same request as `fairchem --submit` (both given to a fake AutoExecutor; the sbatch check is real)."""
    import fairchem.core._cli as fairchem_cli
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config

    parser = flags.get_parser()
    theirs = _requests(
        monkeypatch, fairchem_cli, lambda: fairchem_cli.main(*parser.parse_known_args([*SUBMIT_ARGS, "--submit"]))
    )
    ours = _requests(monkeypatch, dens_slurm, lambda: dens_slurm.main(SUBMIT_ARGS))
    assert ours["parameters"] == theirs["parameters"]
    assert theirs["executor"] == {"slurm_max_num_timeout": 3}
    assert ours["executor"] == {"cluster": "slurm", "slurm_max_num_timeout": 3}  # never falls back to local
    assert theirs["parameters"]["gpus_per_node"] == 2 and theirs["parameters"]["cpus_per_task"] == 4
    assert theirs["parameters"]["slurm_additional_parameters"] == {"constraint": "volta"}
    assert type(ours["runner"]) is dens_slurm.DeNSRunner
    assert ours["configs"] == theirs["configs"]  # the same config reaches the node
    # --cpu: the same request, without GPUs
    args, overrides = parser.parse_known_args([*SUBMIT_ARGS, "--submit", "--cpu"])
    cpu = dens_slurm.executor_parameters(args, build_config(args, overrides))
    assert cpu == {k: v for k, v in theirs["parameters"].items() if k != "gpus_per_node"}


# --------------------------------------------------------------------- without SLURM
def path_without_slurm() -> str:
    """PATH minus every folder holding a SLURM client (the suite's cluster installs them in /usr/bin)."""
    folders = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(f for f in folders if f and not any((Path(f) / c).exists() for c in ("sbatch", "srun")))


def test_submit_without_slurm_refuses_and_starts_nothing(tmp_path):
    """No fallback to training here (submitit's AutoExecutor would start local processes)."""
    result = run_submit(
        tmp_path,
        "--mode",
        "train",
        "--config-yml",
        str(QUICKSTART / "eqv2_dens_tiny.yml"),
        "--cpu",
        "--num-gpus",
        "2",
        "--slurm-partition",
        "cpu",
        "--slurm-mem",
        "8",
        "--slurm-timeout",
        "4",
        "--logdir",
        str(tmp_path / "logs"),
        path=path_without_slurm(),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "fairchem-dens submit: SLURM not found: no sbatch or srun on PATH; nothing was submitted or run. "
        "To train on this machine instead, run `fairchem` with the same arguments."
    ]
    assert "Submitted jobs" not in result.stdout
    assert list(tmp_path.iterdir()) == []  # no logs/, no logs/%j/, no experiment log
    assert processes_naming(str(tmp_path)) == []


def test_submit_help_is_ours(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["submit", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: fairchem-dens submit ")
    assert dens_slurm.DESCRIPTION in shown
    assert "Graph Networks for Electrocatalyst Design" not in shown  # fairchem's description
    for option in ("--config-yml", "--cpu", "--num-gpus", "--num-nodes", "--slurm-partition", "--logdir"):
        assert f"\n  {option} " in shown, option  # fairchem's options, listed


@pytest.mark.parametrize(
    "config, message",
    [
        ("missing.yml", "--config-yml missing.yml: no such file"),
        ("broken.yml", "--config-yml broken.yml: while parsing a flow sequence"),
        ("includes.yml", "--config-yml includes.yml: Cannot find include YML missing_base.yml"),
    ],
)
def test_submit_bad_config_is_one_line(tmp_path, monkeypatch, capsys, config, message):
    (tmp_path / "broken.yml").write_text("optim: [1,\n  trainer: forces\n")
    (tmp_path / "includes.yml").write_text("includes:\n  - missing_base.yml\n")
    written = sorted(tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)  # where --logdir (default logs/) would be
    assert cli.main(["submit", "--mode", "train", "--config-yml", config, "--cpu"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fairchem-dens submit: {message}"), line
    assert sorted(tmp_path.iterdir()) == written  # no logs/ folder


def test_gpu_job_runs_fairchems_runner(monkeypatch):
    from fairchem.core._cli import Runner

    calls = []
    monkeypatch.setattr(dens_slurm, "_gpu_present", lambda: True)
    monkeypatch.setattr(Runner, "__call__", lambda self, config: calls.append(config))
    config = {"cpu": False, "submit": True}
    dens_slurm.DeNSRunner()(config)
    assert calls == [config] and calls[0] is config  # fairchem's own __call__, untouched config

    # its checkpoint is fairchem's, resubmitting DeNSRunner
    saves = []
    runner = dens_slurm.DeNSRunner()
    runner.config = {"cpu": False, "checkpoint": None, "timestamp_id": None}
    runner.trainer = SimpleNamespace(save=lambda **kw: saves.append(kw), timestamp_id="T", logger=None)
    runner.task = SimpleNamespace(chkpt_path="/c/checkpoint.pt")
    delayed = runner.checkpoint()
    assert type(delayed.function) is dens_slurm.DeNSRunner
    assert delayed.args[0]["checkpoint"] == "/c/checkpoint.pt" and delayed.args[0]["timestamp_id"] == "T"
    assert saves == [{"checkpoint_file": "checkpoint.pt", "training_state": True}]


def test_cpu_or_gpu_is_decided_without_initialising_cuda(monkeypatch):
    def no_cuda_calls():
        raise AssertionError("must not initialise CUDA: fairchem may still set CUDA_VISIBLE_DEVICES")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda_calls)
    monkeypatch.setattr(torch.cuda, "device_count", no_cuda_calls)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    devices = set()
    monkeypatch.setattr(dens_slurm.os.path, "exists", lambda path: path in devices)
    assert dens_slurm.runs_on_cpu({"cpu": True})
    assert dens_slurm.runs_on_cpu({"cpu": False})  # no /dev/nvidiactl: no usable GPU here
    devices.add("/dev/nvidiactl")
    assert not dens_slurm.runs_on_cpu({"cpu": False}) and dens_slurm.runs_on_cpu({"cpu": True})
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch
    assert dens_slurm.runs_on_cpu({"cpu": False})


def test_epoch_matches_fairchems_loop():
    steps = 7
    for epoch_int in range(3):
        for i in range(steps):
            assert dens_slurm._epoch_at(epoch_int * steps + i + 1, steps) == epoch_int + (i + 1) / steps


class _Requeued(Exception):
    """Stands in for the sys.exit of submitit's handler."""


def _fake_cpu_job(chkpt_path: str = "/c/checkpoint.pt"):
    """A DeNSRunner in a CPU job whose trainer is a linear model, an SGD optimizer and a scheduler."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    trainer = SimpleNamespace(
        step=0, epoch=0.0, train_loader=[None] * 5, optimizer=optimizer, timestamp_id="T", logger=None
    )
    job = SimpleNamespace(
        model=model, optimizer=optimizer, scheduler=scheduler, trainer=trainer, saves=[], after_step={}, requeued=[]
    )
    trainer.save = lambda **kw: job.saves.append(
        (trainer.step, trainer.epoch, model.weight.detach().clone(), scheduler.last_epoch)
    )
    runner = dens_slurm.DeNSRunner()
    runner._cpu, runner.trainer = True, trainer
    runner.config = {"cpu": True, "checkpoint": "/start.pt", "timestamp_id": None}
    runner.task = SimpleNamespace(chkpt_path=chkpt_path)
    runner._boundaries = dens_slurm._StepBoundaries(runner)
    job.runner = runner

    def submitit_handler(signum, frame):  # what submitit's handler does on rank 0
        job.requeued.append(runner.checkpoint())
        raise _Requeued

    job.submitit_handler = submitit_handler
    return job


def _train(job, signal_at, step, steps: int = 10, validation_s: float = 0.0):
    """fairchem's OCPTrainer.train order (epochs of 5 steps); SIGUSR2 raised at one point of one step.

    ``validation_s``: how long the validation of that step takes.
    """
    trainer, optimizer = job.trainer, job.optimizer
    previous = signal.signal(signal.SIGUSR2, job.submitit_handler)
    try:
        with job.runner._boundaries.installed(), pytest.raises(_Requeued):
            for k in range(1, steps + 1):
                trainer.epoch, trainer.step = (k - 1) // 5 + ((k - 1) % 5 + 1) / 5, k
                for point in ("forward", "backward", "update", "after_update", "validation", "after_scheduler"):
                    if point == "update":
                        optimizer.zero_grad()
                        job.model(torch.ones(1, 3)).sum().backward()
                        optimizer.step()
                    elif point == "validation":
                        deadline = time.monotonic() + (validation_s if k == step else 0)
                        while time.monotonic() < deadline:
                            time.sleep(0.01)
                    elif point == "after_scheduler":
                        job.scheduler.step()
                        job.after_step[k] = job.model.weight.detach().clone()
                    if (point, k) == (signal_at, step):
                        signal.raise_signal(signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert signal.getsignal(signal.SIGUSR2) is previous
    (delayed,) = job.requeued
    assert type(delayed.function) is dens_slurm.DeNSRunner
    return delayed.args[0]


@pytest.mark.parametrize(
    "signal_at, step, saved",
    [
        ("forward", 4, 3),  # no weight changed yet in step 4: step 3 at once
        ("backward", 4, 3),
        ("after_update", 4, 4),  # weights of step 4, scheduler not yet: held until step 4 is done
        ("validation", 4, 4),
        ("after_scheduler", 4, 4),
        ("forward", 1, None),  # before the first update of the job: requeued as it was
    ],
)
def test_preemption_is_held_until_a_step_boundary(signal_at, step, saved):
    job = _fake_cpu_job()
    config = _train(job, signal_at, step)
    if saved is None:
        assert job.saves == [] and config["checkpoint"] == "/start.pt"
        return
    ((saved_step, saved_epoch, weights, scheduler_steps),) = job.saves
    assert (saved_step, scheduler_steps) == (saved, saved)  # step, weights and scheduler agree
    assert saved_epoch == dens_slurm._epoch_at(saved, 5)
    assert torch.equal(weights, job.after_step[saved])
    assert config["checkpoint"] == "/c/checkpoint.pt" and config["timestamp_id"] == "T"
    assert job.trainer.step == saved + 1  # the live trainer was left as it was


@pytest.mark.parametrize("on_disk", [True, False])
def test_preemption_held_too_long_requeues_from_the_newest_checkpoint(monkeypatch, tmp_path, on_disk):
    """A step that cannot finish within HOLD_LIMIT_S (a long validation): no save of a half-done step."""
    monkeypatch.setattr(dens_slurm, "HOLD_LIMIT_S", 0.2)
    newest = tmp_path / "checkpoint.pt"
    if on_disk:
        newest.write_bytes(b"written by fairchem at the end of an epoch")
    job = _fake_cpu_job(str(newest))
    config = _train(job, "after_update", 2, validation_s=10)
    assert job.saves == []
    assert config["checkpoint"] == (str(newest) if on_disk else "/start.pt") and config["timestamp_id"] == "T"
