"""Step time and peak memory of DeNS models (ours, fairchem's port) vs the plain models.

Forward + backward on the same batch (the 4-structure fixture of the original
implementation), runs interleaved so machine noise hits every variant alike;
prints medians and ratios to plain EquiformerV2. Inference (eval, no grad) too.

    ./dens.sh run python benchmarks/step_time.py --layers 2 --repeats 20
    ./dens.sh run python benchmarks/step_time.py --family escn
    ./dens.sh run python benchmarks/step_time.py --memory        # peak RSS / CUDA memory per variant
    python benchmarks/step_time.py --device cuda                 # on a GPU machine
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import resource
import sys

from fairchem_dens.testing import (
    TINY_EQV2_BACKBONE,
    TINY_ESCN_BACKBONE,
    batch_from_tensors,
    build_model,
    dens_mode_batch as as_mode,
    eqv2_dens_model_config,
    escn_dens_model_config,
)

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "inputs.pt"


def train_step(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch)
    (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()


@torch.no_grad()
def infer(model, batch):
    model.eval()
    model(batch)


def build_variants(family: str, layers: int, args) -> dict:
    """name -> model; fairchem has no eSCN with DeNS, so eSCN compares ours with plain only."""
    if family == "escn":
        backbone = {**TINY_ESCN_BACKBONE, "num_layers": layers, "sphere_channels": args.channels,
                    "hidden_channels": 2 * args.channels, "lmax_list": [args.lmax], "mmax_list": [2],
                    "num_sphere_samples": 128, "max_neighbors": 20, "cutoff": 6.0}
        return {"plain": build_model(escn_dens_model_config("plain", backbone=backbone)),
                "ours": build_model(escn_dens_model_config("ours", backbone=backbone))}
    backbone = {**TINY_EQV2_BACKBONE, "num_layers": layers, "sphere_channels": args.channels,
                "attn_hidden_channels": args.channels, "ffn_hidden_channels": args.channels,
                "lmax_list": [args.lmax], "mmax_list": [2], "grid_resolution": 18,
                "max_neighbors": 20, "max_radius": 6.0}
    models = {
        "plain": build_model(eqv2_dens_model_config("plain", backbone=backbone)),
        "fairchem-dens-port": build_model(eqv2_dens_model_config("fairchem", backbone=backbone)),
        "ours": build_model(eqv2_dens_model_config("ours", backbone=backbone)),
    }
    # the same weights where they exist, so both DeNS variants do the same arithmetic
    models["fairchem-dens-port"].load_state_dict(models["ours"].state_dict())
    return models


def memory_of(family: str, name: str, layers: int, kind: str, mode: str, args) -> float:
    """Peak memory (MiB) of one variant doing one step, in a fresh process."""
    import subprocess

    code = (
        "import sys; sys.argv=['x']; import benchmarks.step_time as b; "
        f"print(b._peak_memory({family!r}, {name!r}, {layers}, {kind!r}, {mode!r}, {args.channels}, {args.lmax}, {args.device!r}))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_memory(family, name, layers, kind, mode, channels, lmax, device) -> float:
    args = argparse.Namespace(channels=channels, lmax=lmax)
    torch.set_num_threads(1)
    model = build_variants(family, layers, args)[name].to(device)
    batch = as_mode(batch_from_tensors(FIXTURE), mode).to(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    (train_step if kind == "train" else infer)(model, batch)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--lmax", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", choices=["equiformer_v2", "escn"], default="equiformer_v2")
    parser.add_argument("--memory", action="store_true", help="peak memory per variant instead of time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {time.strftime('%Y-%m-%d')} commit {commit} {platform.processor() or platform.machine()} "
          f"threads={args.threads} device={device} torch={torch.__version__}")
    base = batch_from_tensors(FIXTURE)
    if args.memory:
        unit = "CUDA max allocated" if device.type == "cuda" else "peak RSS growth"
        print(f"| layers | step | batch | {unit} per variant |\n|---|---|---|---|")
    else:
        print("| layers | step | batch | plain (ms) | fairchem DeNS port (ms) | ours (ms) | ours / port | ours / plain |")
        print("|---|---|---|---|---|---|---|---|")
    for layers in args.layers:
        models = {k: m.to(device) for k, m in build_variants(args.family, layers, args).items()}
        if args.memory:
            for kind, mode in [("train", "s2ef"), ("train", "full"), ("train", "partial"), ("infer", "s2ef")]:
                cells = [f"{name} {memory_of(args.family, name, layers, kind, mode, args):.0f} MiB"
                         for name in models if name != "plain" or mode == "s2ef"]
                print(f"| {layers} | {kind} | {mode} | " + " | ".join(cells) + " |", flush=True)
            continue
        cases = [("train", mode) for mode in ("s2ef", "full", "partial")] + [("infer", "s2ef")]
        for kind, mode in cases:
            batch = as_mode(base, mode).to(device)
            fn = train_step if kind == "train" else infer
            times = {name: [] for name in models}
            for name, model in models.items():  # warm-up
                if name == "plain" and mode != "s2ef":
                    continue
                fn(model, batch)
            for _ in range(args.repeats):
                for name, model in models.items():
                    if name == "plain" and mode != "s2ef":
                        continue  # plain EquiformerV2 has no DeNS mode
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn(model, batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
            medians = {k: statistics.median(v) for k, v in times.items() if v}
            ours, port, plain = medians["ours"], medians.get("fairchem-dens-port"), medians.get("plain")
            cells = [
                f"{1000 * plain:.0f}" if plain else "-",
                f"{1000 * port:.0f}" if port else "-",
                f"{1000 * ours:.0f}",
                f"{ours / port:.2f}" if port else "-",
                f"{ours / plain:.2f}" if plain else "-",
            ]
            print(f"| {layers} | {kind} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
