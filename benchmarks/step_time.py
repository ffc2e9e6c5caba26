"""Step time of DeNS EquiformerV2 (ours and fairchem's port) vs plain EquiformerV2.

Forward + backward on the same batch (the 4-structure fixture of the original
implementation), runs interleaved so machine noise hits every variant alike;
prints medians and ratios to plain EquiformerV2. Inference (eval, no grad) too.

    ./dens.sh run python benchmarks/step_time.py --layers 2 --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fairchem_dens.testing import TINY_EQV2_BACKBONE, batch_from_tensors, build_model, eqv2_dens_model_config

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "inputs.pt"


def as_mode(batch, mode):
    batch = batch.clone()
    if mode == "s2ef":
        return batch
    gen = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(batch.pos.shape, generator=gen)
    if mode == "partial":
        batch.noise_mask = torch.rand(batch.pos.shape[0], generator=gen) < 0.5
        noise = noise * batch.noise_mask.view(-1, 1)
    batch.pos = batch.pos + noise * (batch.fixed == 0).view(-1, 1)
    batch.denoising_pos_forward = True
    return batch


def train_step(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch)
    (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()


@torch.no_grad()
def infer(model, batch):
    model.eval()
    model(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--lmax", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {time.strftime('%Y-%m-%d')} commit {commit} {platform.processor() or platform.machine()} "
          f"threads={args.threads} device={device} torch={torch.__version__}")
    base = batch_from_tensors(FIXTURE)
    print("| layers | step | batch | plain EqV2 (ms) | fairchem DeNS port (ms) | ours (ms) | ours / port | ours / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for layers in args.layers:
        backbone = {**TINY_EQV2_BACKBONE, "num_layers": layers, "sphere_channels": args.channels,
                    "attn_hidden_channels": args.channels, "ffn_hidden_channels": args.channels,
                    "lmax_list": [args.lmax], "mmax_list": [2], "grid_resolution": 18,
                    "max_neighbors": 20, "max_radius": 6.0}
        models = {
            "plain": build_model(eqv2_dens_model_config("plain", backbone=backbone)).to(device),
            "fairchem-dens-port": build_model(eqv2_dens_model_config("fairchem", backbone=backbone)).to(device),
            "ours": build_model(eqv2_dens_model_config("ours", backbone=backbone)).to(device),
        }
        # the same weights everywhere they exist, so every variant does the same arithmetic
        state = models["ours"].state_dict()
        models["fairchem-dens-port"].load_state_dict(state)
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
            plain = f"{1000 * medians['plain']:.0f}" if "plain" in medians else "-"
            vs_plain = f"{medians['ours'] / medians['plain']:.2f}" if "plain" in medians else "-"
            print(f"| {layers} | {kind} | {mode} | {plain} | {1000 * medians['fairchem-dens-port']:.0f} | "
                  f"{1000 * medians['ours']:.0f} | {medians['ours'] / medians['fairchem-dens-port']:.2f} | {vs_plain} |",
                  flush=True)


if __name__ == "__main__":
    main()
