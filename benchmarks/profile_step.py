"""Where a DeNS training step spends its time beyond the plain S2EF step (torch.profiler, CPU).

Profiles one forward + backward of plain EquiformerV2 and of ours on the same trainer-made
partial-corruption batch of the OC20-like fixture (after warm-up), and prints the operators
whose self CPU time grows the most from plain to ours.

    ./dens.sh run python benchmarks/profile_step.py --layers 2 --top 12
"""

from __future__ import annotations

import argparse
from collections import Counter

from torch.profiler import ProfilerActivity, profile

from fairchem_dens.testing import batch_from_tensors

from step_time import FIXTURE, build_variants, train_step, trainer_batch  # this folder is on sys.path


def self_times(model, batch, repeats: int) -> Counter:
    train_step(model, batch)  # warm-up
    times: Counter = Counter()
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, batch)
        for event in prof.key_averages():
            times[event.key] += event.self_cpu_time_total / 1000 / repeats  # ms
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mode", choices=["full", "partial"], default="partial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    variants = build_variants("equiformer_v2", args.layers, argparse.Namespace(channels=32, lmax=4))
    batch = trainer_batch(batch_from_tensors(FIXTURE), args.mode)
    plain, ours = (self_times(variants[name], batch, args.repeats) for name in ("plain", "ours"))
    print(f"total self CPU: plain {sum(plain.values()):.0f} ms, ours {sum(ours.values()):.0f} ms ({args.mode} batch)")
    print("| operator | plain (ms) | ours (ms) | ours - plain (ms) |\n|---|---|---|---|")
    for key in sorted(set(plain) | set(ours), key=lambda k: plain[k] - ours[k])[: args.top]:
        print(f"| `{key}` | {plain[key]:.1f} | {ours[key]:.1f} | {ours[key] - plain[key]:+.1f} |")


if __name__ == "__main__":
    main()
