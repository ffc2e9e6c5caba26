"""``fairchem-dens submit``: fairchem's ``--submit`` (SLURM through submitit), CPU jobs included.

``fairchem-dens submit ARGS`` takes the arguments of ``fairchem`` (``--submit``
is implied) and submits exactly as ``fairchem --submit`` does: the same
``--slurm-*`` flags, the ``slurm:`` section of the config passed through to
sbatch, job logs in ``--logdir/<job id>/``, an experiment log in
``--logdir/exp/``, and requeue on preemption or time-out (submitit's SIGUSR2).

What differs from fairchem-core 1.10:

* **Only SLURM.** fairchem's ``AutoExecutor`` starts the jobs on this machine
  when SLURM is missing; here a missing ``sbatch``/``srun`` or a refused sbatch
  is a one-line error (:class:`SubmitError`) and nothing is written or started.
* **CPU jobs work.** On the node, fairchem's ``distutils.setup`` assumes a GPU
  when ``submit`` is set (``CUDA_VISIBLE_DEVICES``, ``torch.cuda.set_device``,
  NCCL). For ``--cpu`` (or on a node without a GPU) :class:`DeNSRunner` takes the
  ranks from the SLURM job itself, exports them as the usual ``MASTER_ADDR`` /
  ``MASTER_PORT`` / ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` and hands fairchem a
  copy of the config with ``submit: False`` and ``distributed_backend: gloo``,
  so fairchem's own non-SLURM branch starts gloo from those variables. The
  submission asks for no GPU (``--num-gpus`` is then the number of processes
  per node), ``cpus_per_task`` is fairchem's ``optim.num_workers + 1`` (raise it
  with ``--slurm.cpus_per_task=N`` or ``slurm: {cpus_per_task: N}``) and torch
  uses that many threads unless ``OMP_NUM_THREADS`` is set.
* **CPU jobs are preempted at step boundaries.** The checkpoint written on
  SIGUSR2 holds the state after the last *completed* step, with that step and
  epoch, so the requeued job repeats no step and skips none (see
  :class:`_StepBoundaries`; if a step cannot finish within ``HOLD_LIMIT_S``, the
  job is requeued from the newest checkpoint on disk instead).
* **GPU jobs are unchanged**: same sbatch request, and the job runs fairchem's
  own ``Runner.__call__`` and ``Runner.checkpoint``; only the class resubmitted
  on requeue is this one (which, on a GPU node, again runs fairchem's code).

This module must stay importable on the compute nodes (it is: the plugin is
installed in the job's environment); submitit pickles :class:`DeNSRunner` by
reference.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import yaml
from fairchem.core._cli import Runner
from fairchem.core.common.flags import flags
from fairchem.core.common.utils import (
    build_config,
    create_grid,
    new_trainer_context,
    save_experiment_log,
    setup_logging,
)
from submitit import AutoExecutor, JobEnvironment
from submitit.core.utils import FailedJobError
from submitit.helpers import DelayedSubmission
from torch.distributed.elastic.utils.distributed import get_free_port

from fairchem_dens.errors import FairchemDensError

__all__ = [
    "DeNSRunner",
    "SubmitError",
    "build_parser",
    "executor_parameters",
    "main",
    "missing_slurm_commands",
    "runs_on_cpu",
    "submit",
]

LOG_PREFIX = "fairchem_dens.slurm:"
# How long a preemption/time-out signal may wait for the end of a training step.
# submitit asks SLURM for SIGUSR2 90 s before the kill (--signal=USR2@90); past
# this limit (a long validation, say) the job is requeued from the newest
# checkpoint on disk instead, leaving time to requeue.
HOLD_LIMIT_S = 45.0


# --------------------------------------------------------------------- submission
def executor_parameters(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """submitit parameters of a job: fairchem's ``_cli.main`` request, minus the GPUs for ``--cpu``."""
    parameters = {  # as fairchem.core._cli.main passes them to update_parameters
        "name": args.identifier,
        "mem_gb": args.slurm_mem,
        "timeout_min": args.slurm_timeout * 60,
        "slurm_partition": args.slurm_partition,
        "gpus_per_node": args.num_gpus,
        "cpus_per_task": (config["optim"]["num_workers"] + 1),
        "tasks_per_node": args.num_gpus,
        "nodes": args.num_nodes,
        "slurm_additional_parameters": config.get("slurm", None),
        "slurm_qos": args.slurm_qos,
        "slurm_account": args.slurm_account,
    }
    if config.get("cpu"):
        # A CPU job asks for no GPU; --num-gpus stays the number of ranks per node.
        del parameters["gpus_per_node"]
    return parameters


class SubmitError(FairchemDensError):
    """A refused or failed submission: one line for the user, and the exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def _removed_if_sbatch_fails(folder: Path):
    """When sbatch fails, removes what submitit wrote in ``folder`` for it (a pickle, a script)."""
    created = next((p for p in [*reversed(folder.parents), folder] if not p.exists()), None)
    before = set() if created is not None else set(folder.iterdir())
    try:
        yield
    except FailedJobError:  # sbatch exited non-zero: no job exists that could need these files
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:  # files only: a job folder that appeared meanwhile is another submission's
            for path in set(folder.iterdir()) - before:
                if path.is_file():
                    path.unlink()
        raise


def missing_slurm_commands() -> list[str]:
    """The SLURM client commands submitit needs here (sbatch submits; its executor insists on srun) not on PATH."""
    return [name for name in ("sbatch", "srun") if shutil.which(name) is None]


def submit(args: argparse.Namespace, config: dict[str, Any]) -> list:
    """Submits one job (or one per ``--sweep-yml`` point) as ``fairchem --submit`` does; returns the jobs.

    Always to SLURM: submitit's ``AutoExecutor`` left to choose would start the
    jobs on this machine when SLURM is missing. A failed sbatch raises
    :class:`SubmitError` and leaves nothing behind in ``--logdir``.
    """
    configs = create_grid(config, args.sweep_yml) if args.sweep_yml else [config]
    logging.info(f"Submitting {len(configs)} jobs")
    executor = AutoExecutor(folder=args.logdir / "%j", cluster="slurm", slurm_max_num_timeout=3)
    executor.update_parameters(**executor_parameters(args, config))
    for one in configs:
        one["slurm"] = copy.deepcopy(executor.parameters)
        one["slurm"]["folder"] = str(executor.folder)
    try:  # submitit also prints sbatch's stderr; the error below carries it, on one line
        with _removed_if_sbatch_fails(Path(args.logdir).absolute()), contextlib.redirect_stderr(io.StringIO()):
            jobs = executor.map_array(DeNSRunner(), configs)
    except FailedJobError as error:  # its message is sbatch's stderr
        reason = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise SubmitError(f"sbatch failed, nothing was submitted: {reason or 'no message'}") from error
    logging.info(
        f"Submitted jobs: {', '.join([job.job_id for job in jobs])} (SLURM; job logs in "
        f"{executor.folder.parent}/<job id>/)"
    )
    log_file = save_experiment_log(args, jobs, configs)
    logging.info(f"Experiment log saved to: {log_file}")
    return jobs


DESCRIPTION = """\
Submit a fairchem run (training with DeNS, prediction, relaxations) to SLURM,
as `fairchem --submit` does (implied here), with CPU jobs working: with --cpu
no GPU is requested and --num-gpus is the number of processes per node.

Nothing runs on this machine. Without SLURM's sbatch and srun on PATH, or when
sbatch refuses the job, it stops with a one-line error and exit code 1; to train
here instead, run `fairchem` with the same arguments.

Every `fairchem` option is accepted; they are listed below."""


def build_parser() -> argparse.ArgumentParser:
    """``fairchem-dens submit``'s parser: our description over fairchem's options."""
    return argparse.ArgumentParser(
        prog="fairchem-dens submit",
        description=DESCRIPTION,
        parents=[flags.get_parser()],
        add_help=False,  # fairchem's parser brings -h/--help, which prints this parser's help
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    """``fairchem-dens submit``: ``argv`` are ``fairchem``'s arguments; ``--submit`` is implied."""
    setup_logging()
    try:
        submit(*_checked_request(argv))
    except SubmitError as error:
        print(f"fairchem-dens submit: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def _checked_request(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Arguments and config of the submission, refused (:class:`SubmitError`) before anything is written."""
    args, override_args = build_parser().parse_known_args(argv)
    args.submit = True
    if args.num_gpus < 1:
        raise SubmitError(
            f"--num-gpus (ranks per node: GPUs, or processes with --cpu) must be at least 1, got {args.num_gpus}",
            exit_code=2,
        )
    if not args.config_yml.exists():
        raise SubmitError(f"--config-yml {args.config_yml}: no such file", exit_code=2)
    try:
        config = build_config(args, override_args)
    except (OSError, ValueError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise SubmitError(f"--config-yml {args.config_yml}: {reason}", exit_code=2) from error
    missing = missing_slurm_commands()
    if missing:
        raise SubmitError(
            f"SLURM not found: no {' or '.join(missing)} on PATH; nothing was submitted or run. "
            "To train on this machine instead, run `fairchem` with the same arguments."
        )
    return args, config


# --------------------------------------------------------------------- on the node
def runs_on_cpu(config: dict[str, Any]) -> bool:
    """True when a job must run without CUDA: ``--cpu``, or certainly no GPU on the node.

    Decided without initialising CUDA (``torch.cuda.is_available()`` would): the
    GPU path must reach fairchem's ``distutils.setup`` untouched, which may still
    narrow ``CUDA_VISIBLE_DEVICES`` per rank (``use_cuda_visibile_devices``).
    """
    return bool(config.get("cpu")) or not _gpu_present()


def _gpu_present() -> bool:
    """This torch has CUDA (or ROCm) and the node has the device its driver opens."""
    if torch.version.hip is not None:
        return os.path.exists("/dev/kfd")
    return torch.version.cuda is not None and os.path.exists("/dev/nvidiactl")


class DeNSRunner(Runner):
    """fairchem's :class:`~fairchem.core._cli.Runner` that also runs CPU jobs.

    With CUDA and without ``--cpu`` it *is* fairchem's Runner (``super()``), so
    GPU jobs behave exactly as with ``fairchem --submit``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.task = None
        self.trainer = None
        self._cpu = False
        self._boundaries: _StepBoundaries | None = None

    def __call__(self, config: dict) -> None:
        if not runs_on_cpu(config):
            return super().__call__(config)
        self._cpu = True
        self.config = config  # what a requeue resubmits (submit=True, as submitted)
        setup_logging()  # as new_trainer_context does, so that the set-up below is logged too
        with new_trainer_context(config=_prepare_cpu_job(config)) as ctx:
            self.task = ctx.task
            self.trainer = ctx.trainer
            self.task.setup(self.trainer)
            self._boundaries = _StepBoundaries(self)
            with self._boundaries.installed():
                self.task.run()
        return None

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on SIGUSR2: save, and return the job to requeue."""
        if not self._cpu:  # fairchem's checkpoint, resubmitting this class
            delayed = super().checkpoint(*args, **kwargs)
            return DelayedSubmission(type(self)(), *delayed.args, **delayed.kwargs)

        config = copy.deepcopy(self.config)
        trainer, boundaries = self.trainer, self._boundaries
        if trainer is not None:
            config["timestamp_id"] = trainer.timestamp_id
        if trainer is None or boundaries is None or boundaries.untouched():
            # Nothing trained in this job yet: run it again as it was.
            logging.info(
                f"{LOG_PREFIX} interrupted before this job's first step; "
                f"requeued from {config.get('checkpoint') or 'the start'}"
            )
            return DelayedSubmission(type(self)(), config)
        if trainer.logger is not None:
            trainer.logger.mark_preempting()
        step = boundaries.consistent_step()
        if step is None:
            # In the middle of a step (held back too long, or called from outside the
            # handler): the live state is not a valid checkpoint (half-updated, or
            # EMA weights swapped in for validation). Resume from the newest
            # checkpoint on disk; the steps after it are trained again.
            if os.path.exists(self.task.chkpt_path):
                config["checkpoint"] = self.task.chkpt_path
            logging.warning(
                f"{LOG_PREFIX} preempted inside step {trainer.step}, which could not finish in time; "
                f"requeued from {config.get('checkpoint') or 'the start'}"
            )
            return DelayedSubmission(type(self)(), config)
        epoch = _save_completed_step(trainer, step)
        config["checkpoint"] = self.task.chkpt_path
        logging.info(
            f"{LOG_PREFIX} preempted; saved step {step} (epoch {epoch}) to "
            f"{config['checkpoint']}, timestamp_id {config['timestamp_id']}"
        )
        return DelayedSubmission(type(self)(), config)


def _prepare_cpu_job(config: dict[str, Any]) -> dict[str, Any]:
    """Sets up the environment of a CPU job; returns the config to give fairchem.

    Ranks come from the job (submitit reads SLURM_PROCID, SLURM_LOCALID,
    SLURM_NTASKS and the node list). With ``submit`` off, fairchem's
    ``distutils.setup`` takes its non-SLURM branch: it reads LOCAL_RANK, leaves
    CUDA alone (``use_cuda_visibile_devices`` with ``cpu``) and initialises
    ``distributed_backend`` (gloo) from the MASTER_ADDR/MASTER_PORT/RANK set here.
    """
    job = JobEnvironment()
    world_size = job.num_tasks
    if world_size != config["world_size"]:
        raise RuntimeError(
            f"this job has {world_size} tasks but the config expects world_size="
            f"{config['world_size']} (--num-gpus x --num-nodes)"
        )
    if world_size == 1:
        address, port = "127.0.0.1", get_free_port()
    else:  # every rank must agree: first node of the job, port derived from the job id
        address = job.hostnames[0]
        port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
    os.environ.update(
        MASTER_ADDR=address,
        MASTER_PORT=str(port),
        RANK=str(job.global_rank),
        LOCAL_RANK=str(job.local_rank),
        WORLD_SIZE=str(world_size),
    )
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(cpus))  # the CPUs of this task, not those of the whole node
    logging.info(
        f"{LOG_PREFIX} CPU job: rank {job.global_rank} of {world_size} (local rank {job.local_rank}), "
        f"gloo at {address}:{port}, {torch.get_num_threads()} torch threads"
    )
    prepared = copy.deepcopy(config)
    prepared.update(submit=False, cpu=True, distributed_backend="gloo", use_cuda_visibile_devices=True)
    return prepared


def _epoch_at(step: int, steps_per_epoch: int) -> float:
    """``trainer.epoch`` after ``step``, computed as fairchem's training loop does."""
    if step <= 0:
        return 0.0
    epoch_int = (step - 1) // steps_per_epoch
    return epoch_int + (step - epoch_int * steps_per_epoch) / steps_per_epoch


def _save_completed_step(trainer, step: int) -> float:
    """Saves ``checkpoint.pt`` as of the end of ``step`` (the weights already are); returns its epoch."""
    live = trainer.step, trainer.epoch
    trainer.step = step
    trainer.epoch = _epoch_at(step, len(trainer.train_loader))
    try:
        trainer.save(checkpoint_file="checkpoint.pt", training_state=True)
        return trainer.epoch
    finally:
        trainer.step, trainer.epoch = live


class _StepBoundaries:
    """Holds submitit's SIGUSR2 handler back until the trainer's state is "after step k".

    In fairchem's training loop one step is: ``trainer.step = k``, forward,
    backward, ``optimizer.step()``, EMA update, logging, periodic checkpoint and
    validation, ``scheduler.step()``. A signal can land anywhere in it.
    fairchem's Runner saves whatever is there, e.g. ``step = k`` with the
    weights of step k-1 (the requeued job then never trains on batch k), or the
    weights of k with the scheduler of k-1.

    Here the signal is handled at once if no weight changed since step k-1
    finished (before ``optimizer.step()`` of step k: the checkpoint is step k-1),
    and otherwise at the start of the next ``optimizer.step()``, when step k is
    complete (the checkpoint is step k). Optimizer step hooks, a public torch API,
    tell where the loop is; nothing of fairchem's is modified. A signal held for
    more than :data:`HOLD_LIMIT_S` is handled anyway (see ``DeNSRunner.checkpoint``).
    """

    def __init__(self, runner: DeNSRunner) -> None:
        self.trainer = runner.trainer
        self.updates_started = 0  # optimizer.step() calls begun in this job
        self.in_update = False  # inside optimizer.step()
        self.done_step: int | None = None  # trainer.step when optimizer.step() last returned
        self.at_boundary = False  # a held-back signal is being handled before optimizer.step()
        self.pending: int | None = None  # signal held back
        self.overdue = False  # held back longer than HOLD_LIMIT_S
        self.handling = False
        self._submitit_handler = None
        self._timer: threading.Timer | None = None

    def untouched(self) -> bool:
        """No optimizer update has begun in this job: its state is the one it started from."""
        return self.updates_started == 0

    def consistent_step(self) -> int | None:
        """The step the trainer's state is exactly "after", or None in the middle of an update."""
        if self.at_boundary:
            return self.trainer.step - 1
        if not self.in_update and self.done_step is not None and self.trainer.step == self.done_step + 1:
            return self.done_step
        return None

    @contextlib.contextmanager
    def installed(self):
        handler = signal.getsignal(signal.SIGUSR2)
        if not callable(handler) or threading.current_thread() is not threading.main_thread():
            yield  # not run by submitit: nothing to hold back
            return
        self._submitit_handler = handler
        optimizer = self.trainer.optimizer
        hooks = [
            optimizer.register_step_pre_hook(self._before_update),
            optimizer.register_step_post_hook(self._after_update),
        ]
        signal.signal(signal.SIGUSR2, self._on_signal)
        try:
            yield
        finally:
            self._stop_timer()
            signal.signal(signal.SIGUSR2, handler)
            for hook in hooks:
                hook.remove()
            if self.pending is not None:
                logging.info(f"{LOG_PREFIX} training finished before the held-back signal was handled")

    def _on_signal(self, signum: int, frame) -> None:
        if self.handling:
            return
        if self.overdue or self.untouched() or self.consistent_step() is not None:
            self._handle(signum, frame)
        elif self.pending is None:
            logging.info(
                f"{LOG_PREFIX} {signal.Signals(signum).name} during step {self.trainer.step}: "
                "checkpointing when it is complete"
            )
            self.pending = signum
            self._timer = threading.Timer(HOLD_LIMIT_S, self._give_up_waiting, (signum,))
            self._timer.daemon = True
            self._timer.start()

    def _give_up_waiting(self, signum: int) -> None:  # timer thread: re-raise, handled at once
        if self.pending is None or self.handling:
            return
        self.pending, self.overdue = None, True
        os.kill(os.getpid(), signum)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handle(self, signum: int, frame) -> None:
        self._stop_timer()
        self.handling = True
        try:  # submitit: checkpoint(), requeue, sys.exit (on rank 0; other ranks just return)
            self._submitit_handler(signum, frame)
        finally:
            self.handling = False

    def _before_update(self, optimizer, args, kwargs) -> None:
        if self.pending is not None and not self.handling:
            signum, self.pending = self.pending, None
            self.at_boundary = True
            try:
                self._handle(signum, None)
            finally:
                self.at_boundary = False
        self.updates_started += 1
        self.in_update = True

    def _after_update(self, optimizer, args, kwargs) -> None:
        self.done_step = self.trainer.step
        self.in_update = False


if __name__ == "__main__":
    # Through the package, so that the pickled Runner is fairchem_dens.slurm.DeNSRunner, not __main__'s.
    from fairchem_dens.slurm import main as _main

    sys.exit(_main())
