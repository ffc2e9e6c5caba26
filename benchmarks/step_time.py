"""Step time and peak memory of DeNS models (ours, fairchem's port) vs the plain models.

Forward + backward on the batches the trainer really makes: the 4-structure OC20-like
fixture of the original implementation (slabs with a fixed bottom layer, tags) or four
small molecules (`--system molecules`), corrupted by the trainer's own sampling code
(`full`: every free atom noised, which on slabs still leaves the fixed atoms clean;
`partial`: corrupt ratio 0.5). Runs are interleaved so machine noise hits every variant
alike; prints medians and ratios. Plain EquiformerV2 runs its S2EF step on the same
corrupted positions (noise changes the graph, so the clean batch would not compare).
`ours, every atom` is our model with both head blocks
run on every atom (what the previous release and the port do in partial batches).
Inference (eval, no grad) too.

    ./dens.sh run python benchmarks/step_time.py --layers 2 --repeats 20
    ./dens.sh run python benchmarks/step_time.py --family escn
    ./dens.sh run python benchmarks/step_time.py --family esen              # vs fairchem's esen_*_dens
    ./dens.sh run python benchmarks/step_time.py --family esen_conservative
    ./dens.sh run python benchmarks/step_time.py --memory        # peak RSS / CUDA memory per variant
    python benchmarks/step_time.py --device cuda                 # on a GPU machine
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fairchem_dens.testing import (
    TINY_EQV2_BACKBONE,
    TINY_ESCN_BACKBONE,
    TINY_ESEN_BACKBONE,
    batch_from_tensors,
    build_model,
    corrupt_like_trainer,
    eqv2_dens_model_config,
    escn_dens_model_config,
    esen_dens_model_config,
)

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "inputs.pt"


def trainer_batch(base, mode: str, seed: int = 0):
    """``base`` corrupted as DeNSTrainer.corrupt does (S2EF, full or partial corruption)."""
    from fairchem_dens.core.batch import is_dens_batch

    if mode == "s2ef":
        return base.clone()
    batch = corrupt_like_trainer(base, seed=seed, corrupt_ratio=None if mode == "full" else 0.5)
    assert is_dens_batch(batch)
    return batch


def molecule_batch():
    """Four small molecules (EMT labels) in 20 Å boxes: DeNS batches without fixed atoms."""
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from torch_geometric.data import Batch

    from fairchem_dens.datasets.emt_data import atoms_to_data

    entries = []
    for sid, name in enumerate(("CH3CH2OH", "C6H6", "CH3COOH", "C3H8")):
        atoms = molecule(name)
        atoms.center(vacuum=7.0)
        atoms.cell = [20.0, 20.0, 20.0]
        atoms.pbc = True
        atoms.rattle(0.05, seed=sid)
        atoms.calc = EMT()
        entries.append(atoms_to_data(atoms, sid=sid, fid=0, md=0))
    return Batch.from_data_list(entries)


class EveryAtom(torch.nn.Module):
    """Our weights, both head blocks on every atom, combined per atom (the previous release's cost)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        from fairchem_dens.core.batch import corrupted_atoms

        emb = self.model.backbone(batch)
        head = self.model.output_heads["forces"]
        if hasattr(head, "vector_block"):
            force, noise = head._vectors(head.vector_block, emb), head._vectors(head.denoising_pos_block, emb)
        else:
            force = head.force_block(emb["sphere_values"], emb["sphere_points"])
            noise = head.denoising_pos_block(emb["sphere_values"], emb["sphere_points"])
        energy = self.model.output_heads["energy"](batch, emb)["energy"]
        return {"energy": energy, "forces": torch.where(corrupted_atoms(batch).view(-1, 1), noise, force)}


def train_step(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch.clone())  # a copy: gradient-force models replace batch.pos
    sum(value.pow(2).sum() for value in out.values()).backward()


@torch.no_grad()
def infer(model, batch):
    model.eval()
    model(batch.clone())


def build_variants(family: str, layers: int, args) -> dict:
    """name -> model; fairchem has no eSCN with DeNS, so eSCN compares ours with plain only."""
    if family.startswith("esen"):
        backbone = {
            **TINY_ESEN_BACKBONE,
            "num_layers": layers,
            "sphere_channels": args.channels,
            "hidden_channels": args.channels,
            "edge_channels": args.channels,
            "lmax": args.lmax,
            "mmax": 2,
            "num_distance_basis": 64,
            "max_neighbors": 20,
            "cutoff": 6.0,
        }
        suffix = "_conservative" if family == "esen_conservative" else ""
        models = {
            name: build_model(esen_dens_model_config(flavour + suffix, backbone=backbone))
            for name, flavour in (("plain", "plain"), ("fairchem-dens-port", "fairchem"), ("ours", "ours"))
        }
        models["ours"].load_state_dict(models["fairchem-dens-port"].state_dict())
        return models
    if family == "escn":
        backbone = {
            **TINY_ESCN_BACKBONE,
            "num_layers": layers,
            "sphere_channels": args.channels,
            "hidden_channels": 2 * args.channels,
            "lmax_list": [args.lmax],
            "mmax_list": [2],
            "num_sphere_samples": 128,
            "max_neighbors": 20,
            "cutoff": 6.0,
        }
        ours = build_model(escn_dens_model_config("ours", backbone=backbone))
        return {
            "plain": build_model(escn_dens_model_config("plain", backbone=backbone)),
            "ours": ours,
            "ours, every atom": EveryAtom(ours),
        }
    backbone = {
        **TINY_EQV2_BACKBONE,
        "num_layers": layers,
        "sphere_channels": args.channels,
        "attn_hidden_channels": args.channels,
        "ffn_hidden_channels": args.channels,
        "lmax_list": [args.lmax],
        "mmax_list": [2],
        "grid_resolution": 18,
        "max_neighbors": 20,
        "max_radius": 6.0,
    }
    models = {
        "plain": build_model(eqv2_dens_model_config("plain", backbone=backbone)),
        "fairchem-dens-port": build_model(eqv2_dens_model_config("fairchem", backbone=backbone)),
        "ours": build_model(eqv2_dens_model_config("ours", backbone=backbone)),
    }
    # the same weights where they exist, so both DeNS variants do the same arithmetic
    models["fairchem-dens-port"].load_state_dict(models["ours"].state_dict())
    models["ours, every atom"] = EveryAtom(models["ours"])
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
    batch = trainer_batch(batch_from_tensors(FIXTURE), mode).to(device)
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
    parser.add_argument(
        "--family", choices=["equiformer_v2", "escn", "esen", "esen_conservative"], default="equiformer_v2"
    )
    parser.add_argument("--memory", action="store_true", help="peak memory per variant instead of time")
    parser.add_argument("--system", choices=["slabs", "molecules"], default="slabs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"# {time.strftime('%Y-%m-%d')} commit {commit} {platform.processor() or platform.machine()} "
        f"threads={args.threads} device={device} torch={torch.__version__}"
    )
    base = batch_from_tensors(FIXTURE) if args.system == "slabs" else molecule_batch()
    if args.memory:
        unit = "CUDA max allocated" if device.type == "cuda" else "peak RSS growth"
        print(f"| layers | step | batch | {unit} per variant |\n|---|---|---|---|")
    else:
        print(
            "| layers | step | batch | plain (ms) | fairchem DeNS port (ms) | ours, every atom (ms) | ours (ms) "
            "| ours / port | ours / plain | ours / every atom |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    for layers in args.layers:
        models = {k: m.to(device) for k, m in build_variants(args.family, layers, args).items()}
        if args.memory:
            for kind, mode in [("train", "s2ef"), ("train", "full"), ("train", "partial"), ("infer", "s2ef")]:
                cells = [
                    f"{name} {memory_of(args.family, name, layers, kind, mode, args):.0f} MiB"
                    for name in models
                    if name != "plain" or mode == "s2ef"
                ]
                print(f"| {layers} | {kind} | {mode} | " + " | ".join(cells) + " |", flush=True)
            continue
        cases = [("train", mode) for mode in ("s2ef", "full", "partial")] + [("infer", "s2ef")]
        for kind, mode in cases:
            batch = trainer_batch(base, mode).to(device)
            fn = train_step if kind == "train" else infer
            times = {name: [] for name in models}
            # plain EquiformerV2 has no DeNS mode: it runs an S2EF step on the same (moved)
            # positions, so the corrupted graph's cost is the same in both
            for name, model in models.items():  # warm-up
                fn(model, batch)
            for _ in range(args.repeats):
                for name, model in models.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn(model, batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
            medians = {k: statistics.median(v) for k, v in times.items() if v}
            ours, port, plain = medians["ours"], medians.get("fairchem-dens-port"), medians.get("plain")
            every = medians.get("ours, every atom")
            cells = [
                f"{1000 * plain:.0f}" if plain else "-",
                f"{1000 * port:.0f}" if port else "-",
                f"{1000 * every:.0f}" if every else "-",
                f"{1000 * ours:.0f}",
                f"{ours / port:.2f}" if port else "-",
                f"{ours / plain:.2f}" if plain else "-",
                f"{ours / every:.2f}" if every else "-",
            ]
            print(f"| {layers} | {kind} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
