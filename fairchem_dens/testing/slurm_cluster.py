"""A real one-node SLURM for the tests of both integrations (no torch, no fairchem here).

``local_cluster()`` starts it with scripts/slurm_local_up.sh (root and apt needed: Debian's
slurm-wlm and munge are installed when missing), points the SLURM clients and submitit at it
and stops it with scripts/slurm_local_down.sh unless it was already up; it raises
``AssertionError`` with the script's output when the cluster cannot start (a test fails, never
skips). The rest reads jobs: their state, their submitit logs, and waits.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

__all__ = [
    "FINAL_STATES",
    "PARTITION",
    "STATE_DIR",
    "describe",
    "job_logs",
    "local_cluster",
    "push_requeued",
    "squeue",
    "wait_for_end",
    "wait_until",
]

ROOT = Path(__file__).resolve().parents[2]
UP, DOWN = ROOT / "scripts" / "slurm_local_up.sh", ROOT / "scripts" / "slurm_local_down.sh"
STATE_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/fairchem-dens-slurm"))
PARTITION = "debug"
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _daemon_running(name: str, pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text())
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def local_cluster() -> Iterator[str]:
    """The local cluster, up while the context lasts; yields its partition name."""
    env = {**os.environ, "SLURM_LOCAL_DIR": str(STATE_DIR), "SLURM_LOCAL_PARTITION": PARTITION}
    was_up = _daemon_running("slurmctld", STATE_DIR / "slurmctld.pid")  # started by hand: leave it up
    try:
        up = subprocess.run(["bash", str(UP)], check=False, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"scripts/slurm_local_up.sh did not finish in 600 s:\n{error.stderr}") from error
    if up.returncode != 0:
        if not was_up:  # stop whatever it did start
            subprocess.run(["bash", str(DOWN)], check=False, env=env, capture_output=True, timeout=120)
        raise AssertionError(
            f"the local SLURM cluster did not start (scripts/slurm_local_up.sh exit "
            f"{up.returncode}):\n{up.stderr}{up.stdout}"
        )
    saved = {key: os.environ.get(key) for key in ("PATH", "SLURM_CONF")}
    # the sacct stand-in first on PATH (submitit polls sacct), clients pointed at this cluster
    os.environ["PATH"] = f"{STATE_DIR / 'bin'}{os.pathsep}{os.environ['PATH']}"
    os.environ["SLURM_CONF"] = str(STATE_DIR / "slurm.conf")
    try:
        yield PARTITION
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not was_up:
            subprocess.run(["bash", str(DOWN)], check=False, env=env, capture_output=True, timeout=120)


def squeue(job_id: str, fields: str) -> str:
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", fields],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.strip()


def job_logs(folder: Path, job_id: str, task: int = 0) -> str:
    """The job's stdout + stderr (submitit appends across requeues)."""
    parts = [folder / f"{job_id}_{task}_log.{kind}" for kind in ("out", "err")]
    return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())


def describe(job: SimpleNamespace) -> str:
    """What to print when a test fails: the job's state and the end of its logs (``job.id``, ``job.folder``)."""
    logs = job_logs(job.folder, job.id)
    ctl = STATE_DIR / "slurmctld.log"
    return (
        f"job {job.id}: {squeue(job.id, '%T %r') or '(not in squeue)'}\n--- job log (end) ---\n{logs[-6000:]}"
        f"\n--- slurmctld.log (end) ---\n{ctl.read_text()[-1500:] if ctl.exists() else ''}"
    )


def wait_until(what: str, condition: Callable[[], object], job: SimpleNamespace, timeout: float, every: float = 0.5):
    """``condition()``'s first true value, polled every ``every`` s; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{describe(job)}")


def wait_for_end(job: SimpleNamespace, timeout: float = 300) -> str:
    """Waits for the job to end; AssertionError unless it COMPLETED."""
    state = wait_until(
        f"job {job.id} to finish",
        lambda: squeue(job.id, "%T") if squeue(job.id, "%T") in FINAL_STATES else None,
        job,
        timeout,
        every=1.0,
    )
    assert state == "COMPLETED", describe(job)
    return state


def push_requeued(job: SimpleNamespace) -> None:
    """SLURM holds a requeued job ~2 minutes (BeginTime): wait for that, then start it in 5 s (not now)."""
    wait_until(
        "the requeued job to be held",
        lambda: squeue(job.id, "%T %r") == "PENDING BeginTime",
        job,
        timeout=120,
        every=0.2,
    )
    subprocess.run(["scontrol", "update", f"jobid={job.id}", "StartTime=now+5"], check=True, timeout=30)
