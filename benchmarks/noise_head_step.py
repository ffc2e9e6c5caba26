"""Training-step cost of the block noise head against the linear one (``noise_head: block`` / ``linear``).

The paper-regime recipe's model (``configs/md17/esen/paper_md17_conservative.yml``: a conservative
eSEN, 2 layers, 16 channels, lmax 2) on the batches its trainer makes: 8 frames of the shipped
GFN2-xTB ethanol trajectory per batch, corrupted by the trainer's own code with the MD17 settings
(each structure with probability 0.25, 25 % of its atoms, sigma 0.05 Å), so most batches hold a
few corrupted atoms and some none. Forward and backward (gradient forces: second order) of the
same batches for both heads, interleaved so machine noise hits both alike; prints the median step
time of each and the ratio, over all batches and over the DeNS batches alone.

    ./dens.sh run python benchmarks/noise_head_step.py --batches 40 --repeats 5
    ./dens.sh run python benchmarks/noise_head_step.py --channels 128 --layers 6   # the paper's width
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from fairchem_dens.core.batch import corrupt_batch, is_dens_batch
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.datasets.lmdb_io import read_lmdb
from fairchem_dens.datasets.md17 import convert_md17
from fairchem_dens.resources import configs_dir, example_trajectory
from fairchem_dens.testing import build_model, esen_dens_model_config


def md17_settings() -> DeNSConfig:
    from fairchem.core.common.utils import load_config

    optim = load_config(str(configs_dir() / "md17" / "esen" / "paper_md17_conservative.yml"))[0]["optim"]
    return DeNSConfig.from_optim(optim)


def batches(count: int, seed: int, folder) -> list:
    from torch_geometric.data import Batch

    frames = list(read_lmdb(folder / "train"))
    settings = md17_settings()
    made = []
    for step in range(count):
        batch = Batch.from_data_list(frames[8 * step : 8 * step + 8])
        corrupt_batch(settings, batch, seed=seed, step=step)
        made.append(batch)
    return made


def step(model, batch) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    out = model(batch.clone())
    (out["energy"].square().sum() + out["forces"].square().sum()).backward()
    return time.perf_counter() - start


def main() -> None:
    import tempfile
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = {
        "use_pbc": True,
        "otf_graph": True,
        "regress_forces": True,
        "regress_stress": False,
        "max_neighbors": 500,
        "cutoff": 5.0,
        "max_num_elements": 100,
        "num_layers": args.layers,
        "sphere_channels": args.channels,
        "hidden_channels": args.channels,
        "edge_channels": args.channels,
        "lmax": 2,
        "mmax": 1,
        "distance_function": "gaussian",
        "num_distance_basis": 32,
        "norm_type": "rms_norm_sh",
        "act_type": "gate",
        "mlp_type": "spectral",
        "use_envelope": True,
    }
    models = {
        head: build_model(
            esen_dens_model_config(
                "ours_conservative", backbone=copy.deepcopy(backbone), noise_head=head, use_force_encoding=True
            )
        ).train()
        for head in ("linear", "block")
    }
    with tempfile.TemporaryDirectory() as tmp:
        convert_md17(example_trajectory(), Path(tmp) / "data", molecule="ethanol")
        made = batches(args.batches, 0, Path(tmp) / "data")
    dens = [i for i, b in enumerate(made) if is_dens_batch(b)]
    times = {head: [[] for _ in made] for head in models}
    for head in models:  # warm-up
        step(models[head], made[0])
    for _ in range(args.repeats):
        for index, batch in enumerate(made):
            for head, model in models.items():
                times[head][index].append(step(model, batch))
    medians = {head: [statistics.median(t) for t in per_batch] for head, per_batch in times.items()}
    total = {head: sum(values) for head, values in medians.items()}
    dens_total = {head: sum(values[i] for i in dens) for head, values in medians.items()}
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
        f"eSEN {args.layers} layers x {args.channels} channels, conservative, {len(made)} batches of 8 ethanol "
        f"frames ({len(dens)} DeNS batches), median of {args.repeats} per batch"
    )
    for head in models:
        print(
            f"  noise_head {head:<6}: {1000 * total[head] / len(made):7.1f} ms a step, "
            f"{1000 * dens_total[head] / max(1, len(dens)):7.1f} ms a DeNS step"
        )
    print(
        f"block / linear: {total['block'] / total['linear']:.3f} over all batches, "
        f"{dens_total['block'] / dens_total['linear']:.3f} over the DeNS batches"
    )


if __name__ == "__main__":
    main()
