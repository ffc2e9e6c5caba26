"""The quickstart: DeNS vs no DeNS on the built-in EMT example, through fairchem's CLI.

Generates the data if missing, trains a tiny EquiformerV2 with DeNS and
fairchem's own EquiformerV2 without it (``fairchem --mode train``), predicts
held-out frames with each (``fairchem --mode predict``), and prints a table of
energy and force errors with the training times. A learning-curve PNG is
written beside the runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["QuickstartRun", "run_quickstart", "configs_dir", "fairchem_command"]

VARIANTS = {
    "dens": ("EquiformerV2 + DeNS", "quickstart/eqv2_dens_tiny.yml"),
    "plain": ("EquiformerV2", "quickstart/eqv2_tiny.yml"),
}


def configs_dir() -> Path:
    """The shipped ``configs/`` folder (override with ``FAIRCHEM_DENS_CONFIGS``)."""
    folder = Path(os.environ.get("FAIRCHEM_DENS_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))
    if not (folder / "quickstart").is_dir():
        raise FileNotFoundError(
            f"shipped configs not found at {folder}: run from a checkout installed with "
            "`pip install -e .`, or set FAIRCHEM_DENS_CONFIGS to the repository's configs/ folder"
        )
    return folder


def fairchem_command() -> list[str]:
    """fairchem's own command line, from the same environment as this interpreter."""
    script = Path(sys.executable).parent / "fairchem"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from fairchem.core._cli import main; main()"]


@dataclass
class QuickstartRun:
    """Results of one variant."""

    name: str
    label: str
    train_seconds: float
    energy_mae_mev: dict[str, float]
    force_mae_mev: dict[str, float]
    checkpoint: Path
    curve: list[tuple[int, float]]


_METRIC = re.compile(r"(\w+): ([-+0-9.e]+)")


def _progress(line: str) -> str | None:
    """A one-line summary of fairchem's metric lines (train every print_every steps, val)."""
    values = dict(_METRIC.findall(line))
    if "forces_mae" not in values and "denoising_pos_mae" not in values:
        return None
    if "step" in values:  # a training log line
        text = f"step {float(values['step']):5.0f}  epoch {float(values['epoch']):5.2f}  loss {float(values['loss']):8.3f}"
        if "forces_mae" in values:
            text += f"  train F MAE {1000 * float(values['forces_mae']):6.1f} meV/Å"
        if "denoising_pos_mae" in values:
            text += f"  noise MAE {1000 * float(values['denoising_pos_mae']):5.1f} mÅ"
        return text
    if "energy_mae" in values:
        return (f"validation  E MAE {1000 * float(values['energy_mae']):7.1f} meV  "
                f"F MAE {1000 * float(values['forces_mae']):6.1f} meV/Å")
    return None


def _stream(command: list[str], log_path: Path, label: str, cwd: Path) -> float:
    """Runs a command, copying its output to a log and a progress summary to the screen."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env
    ) as process:
        for line in process.stdout:
            log.write(line)
            summary = _progress(line)
            if summary is None and ("Traceback" in line or "Error" in line):
                summary = line.strip()[-200:]
            if summary:
                print(f"  [{label} {time.perf_counter() - start:5.0f}s] {summary}", flush=True)
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"{label}: `{' '.join(command)}` failed with exit code {code}; see {log_path}")
    return time.perf_counter() - start


def _load_split(folder: Path) -> dict[str, tuple[float, np.ndarray]]:
    """Reference energy and free-atom forces of every frame, keyed like fairchem's ids."""
    from fairchem_dens.datasets.lmdb_dataset import read_lmdb

    return {
        f"{int(data.sid)}_{int(data.fid)}": (float(data.energy), data.forces[data.fixed == 0].numpy())
        for data in read_lmdb(folder)
    }


def prediction_errors(predictions: Path, split_folder: Path) -> tuple[float, float]:
    """Energy MAE (meV) and force MAE (meV/Å, per component) of an ``s2ef_predictions.npz``."""
    reference = _load_split(split_folder)
    with np.load(predictions) as npz:
        ids, energies = npz["ids"], npz["energy"].astype(np.float64)
        forces = np.split(npz["forces"].astype(np.float64), npz["chunk_idx"])
    if sorted(ids.tolist()) != sorted(reference):
        raise ValueError(f"{predictions} ids do not match the frames of {split_folder}")
    energy_errors = [abs(e - reference[i][0]) for i, e in zip(ids, energies)]
    force_errors = np.concatenate([np.abs(f - reference[i][1]).ravel() for i, f in zip(ids, forces)])
    return 1000.0 * float(np.mean(energy_errors)), 1000.0 * float(np.mean(force_errors))


def _learning_curve(log_dir: Path) -> list[tuple[int, float]]:
    """Validation force MAE (meV/Å) against step, from fairchem's tensorboard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it reports its file scan at INFO

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    tag = "val/forces_mae"
    if tag not in accumulator.Tags().get("scalars", []):
        return []
    return [(event.step, 1000.0 * event.value) for event in accumulator.Scalars(tag)]


def _plot(runs: list[QuickstartRun], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no learning-curve plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        if run.curve:
            steps, values = zip(*run.curve)
            ax.plot(steps, values, marker="o", label=run.label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation force MAE (meV/Å)")
    ax.set_title("Tiny EquiformerV2 on EMT data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_quickstart(
    workdir: Path,
    *,
    epochs: int | None = None,
    n_systems: int = 48,
    seed: int = 0,
    variants: tuple[str, ...] = ("dens", "plain"),
) -> list[QuickstartRun]:
    """Runs the whole quickstart and returns the results.

    Args:
        workdir: where data, runs, logs and the plot go.
        epochs: override of the configs' ``optim.max_epochs``.
        n_systems: adsorbate/slab systems in the generated data.
        seed: data and training seed.
        variants: which of ``dens`` and ``plain`` to train.
    """
    from fairchem_dens.datasets.emt_data import generate_emt_dataset

    workdir = Path(workdir).resolve()
    data_dir = workdir / "data"
    if not (data_dir / "train" / "data.lmdb").exists():
        print(f"Generating the EMT example data in {data_dir} ...", flush=True)
        generate_emt_dataset(data_dir, n_systems=n_systems, seed=seed, holdout_adsorbate="OH")
    configs = configs_dir()
    results = []
    for name in variants:
        label, config = VARIANTS[name]
        run_dir = workdir / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        common = [
            "--config-yml", str(configs / config),
            "--cpu",
            "--run-dir", str(run_dir),
            "--seed", str(seed),
            f"--dataset.train.src={data_dir / 'train'}",
            f"--dataset.val.src={data_dir / 'val'}",
        ]
        if epochs is not None:
            common.append(f"--optim.max_epochs={epochs}")
        print(f"\n== Training {label} (log: {run_dir / 'train.log'})", flush=True)
        seconds = _stream(
            [*fairchem_command(), "--mode", "train", "--timestamp-id", "train",
             "--print-every", "20", *common, f"--dataset.test.src={data_dir / 'test'}"],
            run_dir / "train.log", name, workdir,
        )
        checkpoint = run_dir / "checkpoints" / "train" / "best_checkpoint.pt"
        if not checkpoint.exists():
            checkpoint = run_dir / "checkpoints" / "train" / "checkpoint.pt"
        energy, force = {}, {}
        for split in ("test", "ood"):
            stamp = f"predict-{split}"
            _stream(
                [*fairchem_command(), "--mode", "predict", "--timestamp-id", stamp,
                 "--checkpoint", str(checkpoint), *common, f"--dataset.test.src={data_dir / split}"],
                run_dir / f"{stamp}.log", name, workdir,
            )
            energy[split], force[split] = prediction_errors(
                run_dir / "results" / stamp / "s2ef_predictions.npz", data_dir / split
            )
        curve = _learning_curve(run_dir / "logs" / "tensorboard" / "train")
        results.append(QuickstartRun(name, label, seconds, energy, force, checkpoint, curve))
    _report(results, workdir)
    return results


def _report(runs: list[QuickstartRun], workdir: Path) -> None:
    header = f"{'model':<22}{'E MAE test':>12}{'F MAE test':>12}{'E MAE ood':>12}{'F MAE ood':>12}{'train time':>12}"
    units = f"{'':<22}{'(meV)':>12}{'(meV/Å)':>12}{'(meV)':>12}{'(meV/Å)':>12}{'(s)':>12}"
    lines = [header, units]
    for run in runs:
        lines.append(
            f"{run.label:<22}{run.energy_mae_mev['test']:>12.1f}{run.force_mae_mev['test']:>12.1f}"
            f"{run.energy_mae_mev['ood']:>12.1f}{run.force_mae_mev['ood']:>12.1f}{run.train_seconds:>12.0f}"
        )
    table = "\n".join(lines)
    plot = _plot(runs, workdir / "learning_curve.png")
    print("\n" + table)
    print("test: held-out frames of in-distribution systems; ood: an adsorbate (OH) never seen in training.")
    if plot:
        print(f"Learning curves: {plot}")
    summary = {
        run.name: {
            "label": run.label,
            "train_seconds": run.train_seconds,
            "energy_mae_meV": run.energy_mae_mev,
            "force_mae_meV_per_A": run.force_mae_mev,
            "checkpoint": str(run.checkpoint),
            "val_force_mae_curve": run.curve,
        }
        for run in runs
    }
    (workdir / "quickstart_results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "quickstart_results.txt").write_text(table + "\n")
