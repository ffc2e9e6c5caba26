"""Whole-recipe throughput: real optimizer steps through fairchem's own training loop.

Trains the tiny quickstart EquiformerV2 (the OC20 2M DeNS recipe's settings: p 0.5, σ, corrupt
ratio 0.5, λ_D 10, at small size) for a fixed number of epochs on the same EMT slab data with
the same seed, as three variants — our DeNS trainer and model, fairchem 1.10's own DeNS port
(`equiformerv2_dens`), and plain EquiformerV2 (`equiformerv2_forces`) — each a fresh
`fairchem --mode train` process, interleaved over repeats. Data loading, corruption, loss,
backward, clipping and EMA are all inside. Prints structures per second of the training loop
(from fairchem's own per-step log timestamps, first to last logged step) and the peak RSS of
each process.

    ./dens.sh run python benchmarks/trainer_throughput.py --repeats 3 --epochs 2 --out throughput_output
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path

from fairchem_dens.datasets.emt_data import generate_emt_dataset
from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.resources import configs_dir

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # config, extra flags (the port refuses keys it does not know)
    "plain EquiformerV2 (equiformerv2_forces)": (configs_dir() / "quickstart" / "eqv2_tiny.yml", []),
    "fairchem DeNS port (equiformerv2_dens)": (ROOT / "tests" / "data" / "fairchem_port_dens.yml", []),
    "ours (DeNSTrainer)": (
        configs_dir() / "quickstart" / "eqv2_dens_tiny.yml",
        ["--optim.denoising_pos_params.validate_denoising=False"],
    ),
}
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) .*\bloss: .*\bstep: ([0-9.e+]+)")


def one_run(config: Path, extra: list[str], data: dict, run_dir: Path, epochs: int, seed: int) -> dict:
    command = [
        *fairchem_command(),
        "--mode",
        "train",
        "--config-yml",
        str(config),
        "--cpu",
        "--run-dir",
        str(run_dir),
        "--timestamp-id",
        "run",
        "--seed",
        str(seed),
        "--print-every",
        "1",
        f"--optim.max_epochs={epochs}",
        "--optim.eval_every=100000",
        "--optim.batch_size=4",
        *extra,
        *[f"--dataset.{split}.src={data[split]}" for split in ("train", "val", "test")],
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=run_dir)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    steps = [
        (datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"), float(m.group(2)))
        for m in map(STAMP.match, log.read_text().splitlines())
        if m
    ]
    (t0, s0), (t1, s1) = steps[0], steps[-1]
    return {"steps_per_s": (s1 - s0) / max((t1 - t0).total_seconds(), 1e-9), "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--systems", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("throughput_output"))
    args = parser.parse_args()
    data_dir = args.out / "data"
    data = {s: data_dir / s for s in ("train", "val", "test")}
    if not (data_dir / "dataset.json").exists():
        generate_emt_dataset(data_dir, n_systems=args.systems, seed=0)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(
        f"# {time.strftime('%Y-%m-%d')} commit {commit}, {os.cpu_count()} CPUs, batch 4 structures, "
        f"{args.epochs} epochs, {args.repeats} interleaved repeats"
    )
    results = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for index, (name, (config, extra)) in enumerate(VARIANTS.items()):
            results[name].append(one_run(config, extra, data, args.out / f"run{repeat}-{index}", args.epochs, seed=0))
    plain = statistics.median(r["steps_per_s"] for r in results[next(iter(VARIANTS))])
    print("| variant | structures/s (median) | relative to plain | peak RSS (MiB, median) |\n|---|---|---|---|")
    for name, runs in results.items():
        rate = statistics.median(r["steps_per_s"] for r in runs)
        rss = statistics.median(r["peak_rss_mib"] for r in runs)
        print(f"| {name} | {4 * rate:.2f} | {rate / plain:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
