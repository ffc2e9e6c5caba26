"""Where a training step's time goes: our DeNS trainer vs fairchem's plain trainer, piece by piece.

Builds each trainer through fairchem's own CLI code path on the same EMT slab data and runs
its real ``train()`` loop (data loading, corruption, forward, loss, backward with clipping
and EMA, metrics, logging) for a few epochs, with timers around the loop's pieces:
``corrupt`` (ours only: the seeded draws and moving the positions), the model forward,
``_compute_loss``, ``_backward`` (backward, clipping, optimizer step, EMA),
``_compute_metrics``; "rest of the loop" is the step's remaining time (data loading,
logging, scheduler). Prints ms per step for each piece, side by side, and the ratio of the
whole step. Variants alternate over repeats in one process, so machine noise hits both.

    ./dens.sh run python benchmarks/loop_overhead.py --repeats 3 --epochs 2
    ./dens.sh run python benchmarks/loop_overhead.py --family escn
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fairchem_dens.datasets.emt_data import generate_emt_dataset
from fairchem_dens.resources import configs_dir
from fairchem_dens.testing import fairchem_trainer, write_variant

QUICK = configs_dir() / "quickstart"
FAMILIES = {  # plain fairchem trainer + model, ours
    "equiformer_v2": (QUICK / "eqv2_tiny.yml", QUICK / "eqv2_dens_tiny.yml"),
    "escn": (None, QUICK / "escn_dens_tiny.yml"),
}
PIECES = ("corrupt", "forward", "_compute_loss", "_backward", "_compute_metrics")


def _timed(record: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record[name] = record.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def _plain_escn(config: dict) -> None:
    config["trainer"] = "equiformerv2_forces"
    config["model"]["backbone"]["model"] = "fairchem.core.models.escn.escn.eSCNBackbone"
    config["model"]["backbone"].pop("use_force_encoding")
    config["model"]["heads"]["forces"]["module"] = "fairchem.core.models.escn.escn.eSCNForceHead"
    for key in ("use_denoising_pos", "denoising_pos_params", "denoising_pos_coefficient"):
        config["optim"].pop(key)


def profile(config: Path, data: dict, epochs: int, extra: list[str]) -> dict[str, float]:
    """ms per optimizer step of each piece of one real ``train()``."""
    record: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory() as run_dir,
        fairchem_trainer(
            config,
            run_dir,
            f"--optim.max_epochs={epochs}",
            "--optim.eval_every=100000",
            "--optim.batch_size=4",
            "--seed",
            "0",
            *[f"--dataset.{s}.src={data[s]}" for s in ("train", "val", "test")],
            *extra,
        ) as ctx,
    ):
        trainer = ctx.trainer
        model_forward = trainer.model.forward
        trainer.model.forward = _timed(record, "forward", model_forward)
        for name in PIECES:
            if name != "forward" and hasattr(trainer, name):
                setattr(trainer, name, _timed(record, name, getattr(trainer, name)))
        start = time.perf_counter()
        trainer.train(disable_eval_tqdm=True)
        total = time.perf_counter() - start
        steps = trainer.step
    record["step"] = total
    # _forward includes corrupt in ours; forward is the model alone in both
    record["rest of the loop"] = total - sum(record.get(p, 0.0) for p in PIECES)
    return {name: 1000 * seconds / steps for name, seconds in record.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="equiformer_v2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--systems", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("loop_overhead_output"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = args.out / "data"
    data = {s: data_dir / s for s in ("train", "val", "test")}
    if not (data_dir / "dataset.json").exists():
        generate_emt_dataset(data_dir, n_systems=args.systems, seed=0)
    plain_config, ours_config = FAMILIES[args.family]
    if plain_config is None:  # plain eSCN: our eSCN config without DeNS, fairchem's model and trainer
        plain_config = write_variant(ours_config, args.out / "escn_plain.yml", _plain_escn)
    variants = {
        "plain": (plain_config, []),
        "ours": (ours_config, ["--optim.denoising_pos_params.validate_denoising=False"]),
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"# {time.strftime('%Y-%m-%d')} commit {commit} {args.family} threads={args.threads} batch 4, "
        f"{args.epochs} epochs, {args.repeats} alternating repeats (median ms per optimizer step)"
    )
    runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (config, extra) in variants.items():
            runs[name].append(profile(config, data, args.epochs, extra))
    rows = ["step", *PIECES, "rest of the loop"]
    median = {
        name: {row: statistics.median(r.get(row, 0.0) for r in results) for row in rows}
        for name, results in runs.items()
    }
    print("| piece | plain (ms/step) | ours (ms/step) | ours - plain (ms) |\n|---|---|---|---|")
    for row in rows:
        a, b = median["plain"][row], median["ours"][row]
        print(f"| {row} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    print(
        f"\nwhole step: ours / plain = {median['ours']['step'] / median['plain']['step']:.3f} "
        f"(throughput ratio {median['plain']['step'] / median['ours']['step']:.3f}); per-repeat step ms: "
        + ", ".join(f"{name} " + "/".join(f"{r['step']:.0f}" for r in results) for name, results in runs.items())
    )


if __name__ == "__main__":
    main()
