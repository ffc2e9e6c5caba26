"""DeNS / plain training-step time and peak memory on a GPU: fp32 and bf16 autocast, direct and conservative.

Measures the integration of the fairchem this environment holds (run it in both):

* fairchem 1.10 (``./dens.sh run``): eSEN, plain against ours (``esen`` / ``esen_conservative`` of
  ``step_time.py``), on four small molecules corrupted by the trainer's own code (partial, ratio 0.5);
* fairchem 2 (``./dens.sh run2``): eSCN-MD, plain against DeNS with the linear and the block noise
  head (``fairchem2_step_time.py``'s steps: forward, fairchem's ``compute_loss``, backward).

Steps are interleaved; prints median times, the ratios, and on CUDA the peak allocated memory of one
step of each (``torch.cuda.max_memory_allocated``). On a CPU it runs too (times only), which is how
it is checked without a GPU.

    python benchmarks/gpu_step.py --repeats 20                 # on a GPU machine, each environment
    python benchmarks/gpu_step.py --device cpu --repeats 2     # a CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the step scripts beside this one
from timing import cuda_peaks, interleaved_medians  # noqa: E402


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def fairchem1_steps(conservative: bool, args) -> dict:
    from fairchem_dens.testing import TINY_ESEN_BACKBONE, build_model, esen_dens_model_config

    import step_time

    backbone = {
        **TINY_ESEN_BACKBONE,
        "num_layers": args.layers,
        "sphere_channels": args.channels,
        "hidden_channels": args.channels,
        "edge_channels": args.channels,
    }
    suffix = "_conservative" if conservative else ""
    models = {
        name: build_model(esen_dens_model_config(flavour + suffix, backbone=dict(backbone))).to(args.device)
        for name, flavour in (("plain", "plain"), ("dens", "ours"))
    }
    models["dens"].load_state_dict(models["plain"].state_dict(), strict=False)
    batch = step_time.trainer_batch(step_time.molecule_batch(), "partial").to(args.device)
    return {name: (lambda index, model=model: step_time.train_step(model, batch)) for name, model in models.items()}


def fairchem2_steps(conservative: bool, args) -> dict:
    import fairchem2_step_time

    functions = fairchem2_step_time.step_functions(
        conservative, 8, args.channels, args.layers, 0.5, args.device, args.repeats + 2
    )
    functions.pop("atoms")
    return functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    fairchem = metadata.version("fairchem-core")
    make_steps = fairchem1_steps if fairchem.startswith("1.") else fairchem2_steps
    cuda = args.device.startswith("cuda")
    card = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    print(
        f"# {time.strftime('%Y-%m-%d')} {card}, torch {torch.__version__}, fairchem-core {fairchem}, "
        f"{args.layers} layers x {args.channels} channels, medians of {args.repeats}"
    )
    for conservative in (False, True):
        for precision in args.precisions:
            steps = make_steps(conservative, args)
            with autocast(args.device, precision):
                medians = interleaved_medians(steps, args.repeats, args.device)
                peaks = cuda_peaks(steps) if cuda else {}
            cells = ", ".join(
                f"{name} {1e3 * value:.1f} ms" + (f" / {peaks[name]:.0f} MiB" if cuda else "")
                for name, value in medians.items()
            )
            ratios = ", ".join(
                f"{name}/plain {value / medians['plain']:.3f}" for name, value in medians.items() if name != "plain"
            )
            print(f"{'conservative' if conservative else 'direct':12s} {precision}: {cells}; {ratios}", flush=True)


if __name__ == "__main__":
    main()
