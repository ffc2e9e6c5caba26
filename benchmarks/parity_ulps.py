"""How far our models' outputs are from the original implementation's fixtures, in float32 ulps.

For each checkpoint in tests/data/original_dens and each case (S2EF, full and partial
corruption, the EMA weights), loads the checkpoint as the parity tests do, runs the seeded
forward and prints max |ours - original| / (eps32 * scale) with the scale the parity test
uses (max |original| of that output; eSCN's EMA forces: its per-sphere-sample values, see
tests/integration/test_checkpoints.py). Run it under other CPU kernels and thread counts to see the
spread the tolerance has to cover:

    ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 ./dens.sh run python benchmarks/parity_ulps.py
    ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=2 ./dens.sh run python benchmarks/parity_ulps.py

With ``--log FILE [FILE ...]`` it instead summarises ``DENS_ULPS_LOG`` files that the test
suite wrote (fairchem_dens/testing/tolerances.py), one column each: the largest deviation in ulps of each
test's comparisons (parametrisations together).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from fairchem_dens.testing import forward_seeded  # noqa: E402
from fairchem_dens.testing.tolerances import EPS32, ORIGINAL_PARITY_ULPS  # noqa: E402

from helpers import (  # noqa: E402  (tests/helpers.py: the original DeNS code's fixtures)
    MODELS,
    MODES,
    ORIGINAL,
    converted_model,
    fixture_case,
    reference,
    sphere_sample_scale,
)


def ulps(ours: torch.Tensor, original: np.ndarray, scale: float | None = None) -> float:
    scale = float(np.abs(original).max()) if scale is None else scale
    return float(np.abs(ours.numpy() - original).max()) / (EPS32 * scale)


def fixtures() -> None:
    print(
        f"# kernels {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}; the tests assert <= {ORIGINAL_PARITY_ULPS} ulps of the scale"
    )
    print("| model | case | energy ulps | forces ulps | max abs diff (E / F) | scale (E / F) |")
    print("|---|---|---|---|---|---|")
    for name in MODELS:
        ref = reference(name)
        cases = [(mode, ORIGINAL / name / "checkpoint.pt", mode) for mode in MODES]
        cases.append(("s2ef_ema", ORIGINAL / name / "best_checkpoint.pt", "s2ef"))  # EMA weights
        for label, path, mode in cases:
            model, _ = converted_model(path)
            with torch.no_grad():
                out = forward_seeded(model, fixture_case(ref, mode), int(ref["forward_seed"]))
            energy, forces = ref[f"{label}_energy"], ref[f"{label}_forces"]
            force_scale = float(np.abs(forces).max())
            if label == "s2ef_ema" and name == "escn_dens":  # as test_ema_weights_are_reordered_correctly
                force_scale = sphere_sample_scale(model, ref)
            diffs = [float(np.abs(out[k].numpy() - ref[f"{label}_{k}"]).max()) for k in ("energy", "forces")]
            print(
                f"| {name} | {label} | {ulps(out['energy'], energy):.2f} | "
                f"{ulps(out['forces'], forces, force_scale):.2f} | {diffs[0]:.1e} / {diffs[1]:.1e} | "
                f"{np.abs(energy).max():.2g} / {force_scale:.2g} |"
            )


def summarise(logs: list[Path]) -> None:
    """Largest deviation per test (parametrisations together) of DENS_ULPS_LOG files, a column each."""
    largest: dict[str, dict[Path, float]] = collections.defaultdict(dict)
    for log in logs:
        for line in log.read_text().splitlines():
            test, _, deviation = line.split("\t")
            test = test.split("[")[0]
            largest[test][log] = max(largest[test].get(log, 0.0), float(deviation))
    print("| test | " + " | ".join(log.stem for log in logs) + " |")
    print("|---|" + "---|" * len(logs))
    for test, by_log in sorted(largest.items()):
        print(f"| `{test}` | " + " | ".join(f"{by_log[log]:.1f}" if log in by_log else "-" for log in logs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, nargs="+", help="summarise DENS_ULPS_LOG files instead")
    args = parser.parse_args()
    if args.log:
        summarise(args.log)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    fixtures()


if __name__ == "__main__":
    main()
