"""Bulk materials: a tiny EquiformerV2 with a stress head, trained with and without DeNS.

Generates the built-in EMT bulk set (`fairchem-dens make-emt-data --bulk`: fcc metals,
strained, rattled and MD frames with energy, forces and stress), trains the bulk quickstart
model (`configs/quickstart/eqv2_dens_bulk_tiny.yml`) through `fairchem --mode train` with
DeNS on and off (same trainer, model, epochs and seed), scores the final checkpoint (EMA
weights) on the test split with `fairchem --mode validate`, and prints energy-per-atom,
force and stress MAE as mean ± std over seeds. Each run's numbers go to JSON as soon as it
finishes, so an interrupted study resumes where it stopped.

    ./dens.sh run python benchmarks/bulk_accuracy.py --seeds 0 1 2 --epochs 30 --out bulk_output
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

from fairchem_dens.datasets.emt_bulk import generate_bulk_dataset
from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.resources import configs_dir

CONFIG = "quickstart/eqv2_dens_bulk_tiny.yml"
VARIANTS = {"EquiformerV2 + stress head": ["--optim.use_denoising_pos=False"], "+ DeNS": []}
METRICS = ("energy_per_atom_mae", "forces_mae", "stress_mae")
UNITS = {"energy_per_atom_mae": ("meV/atom", 1e3), "forces_mae": ("meV/Å", 1e3), "stress_mae": ("meV/Å³", 1e3)}


def run(command: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    return time.perf_counter() - start, result.stdout + result.stderr


def train_and_score(name: str, seed: int, data: dict, out: Path, epochs: int) -> dict:
    run_dir = out / "runs" / f"{'dens' if name == '+ DeNS' else 'plain'}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    common = [
        "--config-yml",
        str(configs_dir() / CONFIG),
        "--cpu",
        "--run-dir",
        str(run_dir),
        "--seed",
        str(seed),
        f"--dataset.train.src={data['train']}",
        f"--optim.max_epochs={epochs}",
        "--optim.eval_every=100000",
        *VARIANTS[name],
    ]
    seconds, _ = run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--timestamp-id",
            "train",
            *common,
            f"--dataset.val.src={data['val']}",
            f"--dataset.test.src={data['test']}",
        ],
        run_dir,
        run_dir / "train.log",
    )
    checkpoint = run_dir / "checkpoints" / "train" / "checkpoint.pt"  # always written by our trainer
    _, log = run(
        [
            *fairchem_command(),
            "--mode",
            "validate",
            "--timestamp-id",
            "test",
            "--checkpoint",
            str(checkpoint),
            *common,
            f"--dataset.val.src={data['test']}",
            f"--dataset.test.src={data['val']}",
        ],
        run_dir,
        run_dir / "validate-test.log",
    )  # one process cannot open one LMDB file twice
    line = [row for row in log.splitlines() if "stress_mae:" in row][-1]
    scores = {metric: float(re.search(rf"\b{metric}: ([0-9.eE+-]+)", line).group(1)) for metric in METRICS}
    return {"train_seconds": seconds, **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bulk_output"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.out / "data"
    if not (data_dir / "dataset.json").exists():
        generate_bulk_dataset(data_dir, seed=0)
    data = {split: data_dir / "aselmdb" / split for split in ("train", "val", "test")}
    results_file = args.out / "bulk_accuracy.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in args.seeds:
        for name in VARIANTS:
            key = f"{name}|seed{seed}|epochs{args.epochs}"
            if key in results:
                continue
            results[key] = train_and_score(name, seed, data, args.out, args.epochs)
            results_file.write_text(json.dumps(results, indent=2))
            print(key, results[key], flush=True)
    print(
        f"\n| model ({args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}) | "
        + " | ".join(f"test {m} ({UNITS[m][0]})" for m in METRICS)
        + " | train time (s) |"
    )
    print("|---|" + "---|" * (len(METRICS) + 1))
    for name in VARIANTS:
        runs = [results[f"{name}|seed{s}|epochs{args.epochs}"] for s in args.seeds]
        cells = []
        for metric in METRICS + ("train_seconds",):
            scale = UNITS.get(metric, ("", 1.0))[1]
            values = [r[metric] * scale for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
