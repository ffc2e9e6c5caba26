"""The quickstart: DeNS vs no DeNS on the built-in GFN2-xTB ethanol data, through fairchem's CLI.

Converts the shipped MD17-format trajectory (``examples/ethanol_gfn2xtb_500K.npz``,
written by ``fairchem-dens make-xtb-md17``) with ``fairchem-dens md17-to-lmdb``,
trains the paper's MD17 regime at CPU size, ``configs/md17/esen/paper_md17_conservative.yml``
(a conservative eSEN whose noise head is a whole message-passing block, the published
MD17 DeNS settings), on the 950 training frames for 10 epochs with and without DeNS for
two seeds each (``fairchem --mode train``, two runs at a time), predicts 500 held-out
frames with each best checkpoint (``fairchem --mode predict``) and prints the force and
energy errors per seed against what a model that learned nothing scores (the mean
energy, zero forces), their means and the DeNS / plain ratios. A validation-curve PNG is
written beside the runs.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fairchem_dens.resources import configs_dir, example_trajectory

__all__ = [
    "QuickstartRun",
    "run_quickstart",
    "train_and_test",
    "run_logged",
    "fairchem_command",
    "prediction_errors",
    "split_frames",
    "null_model_errors",
    "warmup_override",
    "plot_validation_curves",
]

RECIPE = "md17/esen/paper_md17_conservative.yml"
#: Variant -> (label, fairchem overrides of the recipe, which trains with DeNS).
VARIANTS = {
    "plain": ("conservative eSEN", ["--optim.use_denoising_pos=False"]),
    "dens": ("conservative eSEN + DeNS", []),
}
BATCH_SIZE = 8  # the recipe's
EXAMPLE_TRAIN_FRAMES = 950  # the Equiformer MD17 split; 50 validation and 500 test frames remain
EPOCHS = 10  # the recipe's 100 take ~40 minutes a run on one core


def warmup_override(epochs: int) -> list[str]:
    """The recipe's warm-up as a tenth of a run of ``epochs`` (the paper: 10 of 1500 epochs)."""
    return [f"--optim.scheduler_params.warmup_epochs={max(1, epochs // 10)}"]


def fairchem_command() -> list[str]:
    """fairchem's own command line, from the same environment as this interpreter."""
    script = Path(sys.executable).parent / "fairchem"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from fairchem.core._cli import main; main()"]


_VAL = re.compile(r"energy_mae: ([0-9.e+-]+), forces_mae: ([0-9.e+-]+), loss: [0-9.e+-]+, epoch: ([0-9.e+-]+)")
_TRAIN = re.compile(r"forces_mae: ([0-9.e+-]+),.*epoch: ([0-9.e+-]+), step")


def _validation_point(line: str) -> list[float] | None:
    """[epoch, force MAE in meV/Å] of fairchem's validation metrics line, or None."""
    match = _VAL.search(line)
    return [float(match.group(3)), 1000 * float(match.group(2))] if match else None


def parse_curves(log: Path) -> dict[str, list[list[float]]]:
    """Validation and training force MAE (meV/Å) against epoch from a fairchem training log.

    fairchem logs the validation metrics on the line after ``Evaluating on val.``; the
    training lines carry the running force MAE of clean structures (DeNS batches log
    theirs under ``denoising_*``, which the pattern does not match).
    """
    val, train, after_eval = [], [], False
    for line in log.read_text().splitlines():
        if "Evaluating on val" in line:
            after_eval = True
            continue
        if after_eval and (point := _validation_point(line)):
            val.append(point)
            after_eval = False
        elif "step:" in line and (match := _TRAIN.search(line)):
            train.append([float(match.group(2)), 1000 * float(match.group(1))])
    return {"val_force": val, "train_force": train}


_PRINT_LOCK = threading.Lock()
_READ_LOCK = threading.Lock()


class _Fairchem1Progress:
    """The validation lines of a fairchem-1 training log (each follows an `Evaluating on val` line)."""

    def __init__(self) -> None:
        self.after_eval = False

    def __call__(self, line: str) -> str | None:
        summary = None
        if self.after_eval and (point := _validation_point(line)):
            summary = f"epoch {point[0]:5.1f}  validation F MAE {point[1]:6.1f} meV/Å"
        self.after_eval = "Evaluating on val" in line or (self.after_eval and summary is None)
        return summary


def run_logged(
    command: list[str],
    log_path: Path,
    cwd: Path,
    label: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], str | None] | None = None,
) -> float:
    """Runs a command into a log; with a label, echoes its validation lines and errors.

    ``progress`` turns a log line into the summary to echo, or None (default: fairchem 1's validation lines).
    """
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    progress = progress or _Fairchem1Progress()
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env
        ) as process,
    ):
        for line in process.stdout:
            log.write(line)
            if label is None:
                continue
            summary = progress(line)
            if summary is None and ("Traceback" in line or "Error" in line):
                summary = line.strip()[-200:]
            if summary:
                with _PRINT_LOCK:
                    print(f"  [{label} {time.perf_counter() - start:4.0f}s] {summary}", flush=True)
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {code}; see {log_path}")
    return time.perf_counter() - start


def split_frames(split: Path) -> int:
    """Frames of a split folder, from its metadata.npz (LMDB or aselmdb layout).

    Callers pass every split's first_n: fairchem copies the train split's to a split without its own.
    """
    with np.load(split / "metadata.npz") as metadata:
        return len(metadata["natoms"])


def train_and_test(
    config: Path,
    run_dir: Path,
    data: Path,
    *,
    n_train: int,
    seed: int,
    epochs: int,
    overrides: Sequence[str] = (),
    eval_every_epochs: int = 5,
    label: str | None = None,
    threads: int | None = None,
    start_checkpoint: Path | None = None,
) -> dict:
    """Trains on the first ``n_train`` training frames, then predicts the test split with the best checkpoint.

    fairchem's ``dataset.train.first_n`` takes a random subset (``md17-to-lmdb`` writes
    the train split as a seeded permutation); validation and test use all their frames,
    the same for every size and seed.

    Args:
        config: a config of the MD17 layout (batch size 8).
        run_dir: checkpoints, logs and predictions go here.
        data: an ``md17-to-lmdb`` output folder.
        n_train: training frames.
        seed: fairchem's ``--seed``.
        epochs: ``optim.max_epochs``.
        overrides: more fairchem command-line overrides.
        eval_every_epochs: validation interval.
        label: echo validation lines under this label (None: silent).
        threads: ``OMP_NUM_THREADS`` of the fairchem processes.
        start_checkpoint: train from these weights (fairchem's ``--checkpoint``), e.g. the
            ``to-conservative`` start of a two-step recipe's second step.

    Returns:
        ``train_seconds``, ``test_energy_meV``, ``test_force_meV_per_A`` and the curves of
        :func:`parse_curves`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = -(-n_train // BATCH_SIZE)
    common = [
        "--config-yml",
        str(config),
        "--cpu",
        "--run-dir",
        str(run_dir),
        "--seed",
        str(seed),
        f"--optim.max_epochs={epochs}",
        f"--dataset.train.src={data / 'train'}",
        f"--dataset.train.first_n={n_train}",
        f"--dataset.val.src={data / 'val'}",
        f"--dataset.val.first_n={split_frames(data / 'val')}",
        *overrides,
    ]
    # fairchem predicts the whole test split at every new best validation score; a one-batch
    # test split keeps that cheap, the real test split is predicted once below.
    seconds = run_logged(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--timestamp-id",
            "train",
            *common,
            f"--print-every={steps_per_epoch}",
            f"--optim.eval_every={eval_every_epochs * steps_per_epoch}",
            f"--dataset.test.src={data / 'test'}",
            "--dataset.test.first_n=8",
            *(["--checkpoint", str(start_checkpoint)] if start_checkpoint else []),
        ],
        run_dir / "train.log",
        run_dir,
        label,
        threads,
    )
    checkpoint = run_dir / "checkpoints" / "train" / "best_checkpoint.pt"
    if not checkpoint.exists():  # no validation ran (fewer epochs than eval_every_epochs)
        checkpoint = checkpoint.with_name("checkpoint.pt")
    run_logged(
        [
            *fairchem_command(),
            "--mode",
            "predict",
            "--timestamp-id",
            "predict",
            "--checkpoint",
            str(checkpoint),
            *common,
            f"--dataset.test.src={data / 'test'}",
            f"--dataset.test.first_n={split_frames(data / 'test')}",
        ],
        run_dir / "predict.log",
        run_dir,
        None,
        threads,
    )
    energy, force = prediction_errors(run_dir / "results" / "predict" / "s2ef_predictions.npz", data / "test")
    return {
        "train_seconds": seconds,
        "test_energy_meV": energy,
        "test_force_meV_per_A": force,
        "checkpoint": str(checkpoint),
        **parse_curves(run_dir / "train.log"),
    }


def _load_split(folder: Path, first_n: int | None = None) -> dict[str, tuple[float, np.ndarray]]:
    """Reference energy and free-atom forces of every frame (the first ``first_n``, in fairchem's
    dataset order, as ``dataset.*.first_n`` takes them), keyed like fairchem's ids."""
    from fairchem_dens.datasets.lmdb_io import read_lmdb

    return {
        f"{int(data.sid)}_{int(data.fid)}": (float(data.energy), data.forces[data.fixed == 0].numpy())
        for data in read_lmdb(folder)[:first_n]
    }


def null_model_errors(data: Path, first_n: int | None = None) -> dict[str, float]:
    """What a model that learned nothing scores on the test split of an ``md17-to-lmdb`` folder.

    ``energy_meV``: MAE of predicting the training-set mean energy; ``force_meV_per_A``: MAE
    of predicting zero forces (the mean |F| component). ``first_n``: only the split's first frames.
    """
    with _READ_LOCK:
        reference = _load_split(data / "test", first_n)
    mean_energy = json.loads((data / "md17_info.json").read_text())["train_statistics"]["energy_mean"]
    return {
        "energy_meV": 1000.0 * float(np.mean([abs(e - mean_energy) for e, _ in reference.values()])),
        "force_meV_per_A": 1000.0 * float(np.mean(np.concatenate([np.abs(f).ravel() for _, f in reference.values()]))),
    }


def prediction_errors(predictions: Path, split_folder: Path, first_n: int | None = None) -> tuple[float, float]:
    """Energy MAE (meV) and force MAE (meV/Å, per component) of an ``s2ef_predictions.npz``
    (of the split's first ``first_n`` frames, when given)."""
    with _READ_LOCK:  # py-lmdb refuses a second open of the same file in one process (parallel runs)
        reference = _load_split(split_folder, first_n)
    with np.load(predictions) as npz:
        ids, energies = npz["ids"], npz["energy"].astype(np.float64)
        forces = np.split(npz["forces"].astype(np.float64), npz["chunk_idx"])
    if sorted(ids.tolist()) != sorted(reference):
        raise ValueError(f"{predictions} ids do not match the frames of {split_folder}")
    energy_errors = [abs(e - reference[i][0]) for i, e in zip(ids, energies)]
    force_errors = np.concatenate([np.abs(f - reference[i][1]).ravel() for i, f in zip(ids, forces)])
    return 1000.0 * float(np.mean(energy_errors)), 1000.0 * float(np.mean(force_errors))


@dataclass
class QuickstartRun:
    """One training run of the quickstart."""

    variant: str
    seed: int
    scores: dict = field(repr=False)

    @property
    def force(self) -> float:
        return self.scores["test_force_meV_per_A"]


def run_quickstart(
    workdir: Path,
    *,
    epochs: int = EPOCHS,
    n_train: int = EXAMPLE_TRAIN_FRAMES,
    seeds: tuple[int, ...] = (0, 1),
    jobs: int | None = None,
) -> list[QuickstartRun]:
    """Runs the whole quickstart and returns the runs.

    Args:
        workdir: where data, runs, logs and the plot go.
        epochs: training epochs of every run (the warm-up is a tenth of them).
        n_train: training frames (the first of the 950-frame train split).
        seeds: training seeds; each trains both variants.
        jobs: runs at a time (default: 2 on two or more CPU cores, else 1), each with
            ``cores // jobs`` threads.

    Raises:
        ValueError: a size outside what the example holds, or a ``data`` folder in
            ``workdir`` that is not the quickstart's, before anything runs.
    """
    from fairchem_dens.datasets.md17 import convert_md17

    for name, value, low, high in (
        ("--frames", n_train, 1, EXAMPLE_TRAIN_FRAMES),
        ("--epochs", epochs, 1, None),
        ("--jobs", jobs, 1, None),
    ):
        if value is not None and (value < low or (high is not None and value > high)):
            raise ValueError(
                f"{name} must be at least {low}" + (f" and at most {high}" if high else "") + f", got {value}"
            )
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name one or more different seeds, got {list(seeds)}")

    workdir = Path(workdir).resolve()
    data = workdir / "data"
    if not (data / "md17_info.json").exists():
        if data.exists():  # the converter refuses to replace a folder: say which and what to do
            raise ValueError(
                f"{data} exists but is not the quickstart's data (no md17_info.json): "
                "choose another --workdir, or move that folder away"
            )
        print(
            f"Converting {example_trajectory().name} into {data} ({EXAMPLE_TRAIN_FRAMES} training frames) ...",
            flush=True,
        )
        convert_md17(example_trajectory(), data, n_train=EXAMPLE_TRAIN_FRAMES, molecule="ethanol")
    cores = os.cpu_count() or 1
    jobs = jobs or max(1, min(2, cores))
    threads = max(1, cores // jobs)
    config = configs_dir() / RECIPE
    plan = [(seed, variant) for seed in seeds for variant in VARIANTS]
    print(
        f"Training {len(plan)} runs ({', '.join(VARIANTS)} x seeds {', '.join(map(str, seeds))}; {n_train} "
        f"frames, {epochs} epochs), {jobs} at a time with {threads} thread(s) each; logs in {workdir / 'runs'}",
        flush=True,
    )

    def one(seed_variant):
        seed, variant = seed_variant
        label = f"{variant} seed {seed}"
        scores = train_and_test(
            config,
            workdir / "runs" / f"{variant}-seed{seed}",
            data,
            n_train=n_train,
            seed=seed,
            epochs=epochs,
            overrides=[*VARIANTS[variant][1], *warmup_override(epochs)],
            eval_every_epochs=1,
            label=label,
            threads=threads,
        )
        with _PRINT_LOCK:
            print(
                f"  [{label}] done in {scores['train_seconds']:.0f} s: test F MAE "
                f"{scores['test_force_meV_per_A']:.1f} meV/Å",
                flush=True,
            )
        return QuickstartRun(variant, seed, scores)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = list(pool.map(one, plan))
    _report(runs, workdir, n_train, epochs, null_model_errors(data))
    return runs


def plot_validation_curves(
    curves: list[tuple[str, int, str, list]], path: Path, *, ylabel: str, title: str
) -> Path | None:
    """A log-scale plot of validation curves, one line per ``(variant, seed, label, [(epoch, value)])``:
    DeNS runs orange, plain ones blue, one line style per seed. None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no validation-curve plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    seeds = sorted({seed for _, seed, _, _ in curves})
    for variant, seed, label, points in curves:
        if points:
            epochs, values = zip(*points)
            ax.plot(
                epochs,
                values,
                color="C1" if variant == "dens" else "C0",
                alpha=0.8,
                linestyle=("-", "--", ":", "-.")[seeds.index(seed) % 4],
                label=label,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _report(runs: list[QuickstartRun], workdir: Path, n_train: int, epochs: int, null: dict[str, float]) -> None:
    by_seed = {(run.variant, run.seed): run for run in runs}
    seeds = sorted({run.seed for run in runs})
    width = 28
    lines = [
        f"{'model':<{width}}{'seed':>6}{'F MAE test':>13}{'E MAE test':>13}{'train time':>12}",
        f"{'':<{width}}{'':>6}{'(meV/Å)':>13}{'(meV)':>13}{'(s)':>12}",
        f"{'learned nothing':<{width}}{'':>6}{null['force_meV_per_A']:>13.1f}{null['energy_meV']:>13.1f}{'':>12}",
    ]
    for variant, (label, _) in VARIANTS.items():
        for seed in seeds:
            run = by_seed[(variant, seed)]
            lines.append(
                f"{label:<{width}}{seed:>6}{run.force:>13.1f}{run.scores['test_energy_meV']:>13.1f}"
                f"{run.scores['train_seconds']:>12.0f}"
            )
    means = {variant: statistics.mean(by_seed[(variant, s)].force for s in seeds) for variant in VARIANTS}
    energies = {
        variant: statistics.mean(by_seed[(variant, s)].scores["test_energy_meV"] for s in seeds) for variant in VARIANTS
    }
    ratios = [by_seed[("dens", s)].force / by_seed[("plain", s)].force for s in seeds]
    lines.append("")
    lines.append(
        f"'learned nothing': the training-set mean energy and zero forces. Mean over seeds "
        f"{', '.join(map(str, seeds))}: test F MAE DeNS {means['dens']:.1f}, plain {means['plain']:.1f} "
        f"meV/Å; DeNS / plain = {means['dens'] / means['plain']:.3f} (per seed "
        f"{', '.join(f'{r:.3f}' for r in ratios)}); energy DeNS / plain = "
        f"{energies['dens'] / energies['plain']:.3f}"
    )
    table = "\n".join(lines)
    plot = plot_validation_curves(
        [
            (run.variant, run.seed, f"{VARIANTS[run.variant][0]}, seed {run.seed}", run.scores["val_force"])
            for run in runs
        ],
        workdir / "validation_curves.png",
        ylabel="validation force MAE (meV/Å, 50 frames)",
        title="GFN2-xTB ethanol, conservative eSEN",
    )
    print("\n" + table)
    print(
        f"test: 500 held-out frames of the same trajectory; training on {n_train} frames for {epochs} epochs. "
        'Where DeNS helps and where it costs: BENCHMARKS.md, "Where DeNS helps on a CPU".'
    )
    if plot:
        print(f"Validation curves: {plot}")
    summary = {
        f"{run.variant}-seed{run.seed}": {"variant": run.variant, "seed": run.seed, **run.scores} for run in runs
    }
    summary["mean_force_meV_per_A"] = means
    summary["mean_energy_meV"] = energies
    summary["learned_nothing"] = null
    (workdir / "quickstart_results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "quickstart_results.txt").write_text(table + "\n")
