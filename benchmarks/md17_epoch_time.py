"""One training epoch of the MD17 recipe on one core, this checkout against an earlier commit, and where it goes.

Trains ``configs/md17/esen/paper_md17_conservative.yml`` (conservative eSEN, block noise head)
for one epoch of 950 frames of the shipped GFN2-xTB ethanol (119 steps of 8 molecules, one
validation of 50 frames) through fairchem's own trainer, with DeNS and without, in fresh
processes (``OMP_NUM_THREADS=1``), alternating between this checkout and ``--baseline`` (a git
commit, checked out into a temporary worktree) so machine noise hits both alike; prints the
median epoch time of each and the ratios. ``--profile`` also prints where the DeNS epoch's time
goes (cProfile, cumulative seconds of the trainer's parts).

    ./dens.sh run python benchmarks/md17_epoch_time.py --baseline 61432ce --repeats 3 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Runs in a fresh interpreter with the checkout to measure first on sys.path: one epoch, timed.
EPOCH = r"""
import cProfile, json, pstats, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from fairchem_dens.resources import configs_dir
from fairchem_dens.testing import fairchem_trainer
data, run_dir, profile = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
recipe = configs_dir() / "md17" / "esen" / "paper_md17_conservative.yml"
with fairchem_trainer(recipe, run_dir, f"--dataset.train.src={data / 'train'}", f"--dataset.val.src={data / 'val'}",
                      f"--dataset.test.src={data / 'test'}", "--dataset.test.first_n=8", "--optim.max_epochs=1",
                      "--optim.scheduler_params.warmup_epochs=1", "--optim.eval_every=119", "--print-every=119",
                      "--optim.checkpoint_every=119", *sys.argv[4:]) as context:
    trainer = context.trainer
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    trainer.train()
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - start
    parts = {}
    if profiler:
        stats = pstats.Stats(profiler).stats
        wanted = {"_forward": "forward (model, DeNS hooks)", "_backward": "backward and optimizer step",
                  "_compute_loss": "loss", "__next__": "data loading", "validate": "validation",
                  "corrupt": "DeNS corruption", "dens_node_features": "force encoding",
                  "_noise": "noise head", "generate_graph": "graph", "get_rotmat_and_wigner": "Wigner matrices",
                  "save": "checkpoints"}
        for (file, line, name), (_, _, _, cumulative, _) in stats.items():
            if name in wanted and ("fairchem" in file or "torch/utils/data" in file):
                parts[wanted[name]] = max(parts.get(wanted[name], 0.0), cumulative)
    print("RESULT " + json.dumps({"seconds": seconds, "steps": len(trainer.train_loader), "parts": parts}))
"""


def measure(checkout: Path, data: Path, work: Path, variant: str, profile: bool) -> dict:
    overrides = ["--optim.use_denoising_pos=False"] if variant == "plain" else []
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout)}
    result = subprocess.run(
        [sys.executable, "-c", EPOCH, str(data), str(work), "1" if profile else "0", *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the epoch at {checkout} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="61432ce", help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print where this checkout's DeNS epoch goes")
    args = parser.parse_args()
    from fairchem_dens.datasets.md17 import convert_md17
    from fairchem_dens.resources import example_trajectory

    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        data = temp / "data"
        convert_md17(example_trajectory(), data)
        baseline = temp / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
            check=True,
            capture_output=True,
        )
        try:
            checkouts = {args.baseline: baseline, "this checkout": ROOT}
            times: dict = {(name, v): [] for name in checkouts for v in ("plain", "dens")}
            for repeat in range(args.repeats):
                for variant in ("plain", "dens"):
                    for name, checkout in checkouts.items():
                        work = temp / f"run-{repeat}-{variant}-{abs(hash(name))}"
                        times[(name, variant)].append(measure(checkout, data, work, variant, False)["seconds"])
            parts = measure(ROOT, data, temp / "profiled", "dens", True) if args.profile else None
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], capture_output=True
            )
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"one epoch of 950 ethanol frames (119 steps of 8, one validation), one core, median of {args.repeats}:")
    print(f"{'checkout':>16} {'plain (s)':>10} {'DeNS (s)':>10} {'DeNS / plain':>13}")
    for name in checkouts:
        plain, dens = median[(name, "plain")], median[(name, "dens")]
        print(f"{name:>16} {plain:10.2f} {dens:10.2f} {dens / plain:13.3f}")
    for variant in ("plain", "dens"):
        print(
            f"{variant}: {args.baseline} / this checkout = {median[(args.baseline, variant)] / median[('this checkout', variant)]:.3f}"
        )
    if parts:
        print(
            f"\nwhere this checkout's DeNS epoch goes (cProfile, {parts['seconds']:.2f} s with the profiler on; "
            "cumulative, so parts overlap):"
        )
        for name, seconds in sorted(parts["parts"].items(), key=lambda item: -item[1]):
            print(f"  {name:32} {seconds:6.2f} s  {100 * seconds / parts['seconds']:5.1f} %")


if __name__ == "__main__":
    main()
