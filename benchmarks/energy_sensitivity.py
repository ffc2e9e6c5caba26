"""Does a trained model's energy follow the geometry? The gradient of its predicted energy, against the forces.

For each checkpoint, over test frames of an ``md17-to-lmdb`` folder: the spread of the predicted
energies against the labels' spread, and -dE_pred/dx (autograd through the model's energy, the
same graph code fairchem runs) against the labelled forces: their mean |.| ratio and the MAE. A
model whose energy is nearly flat in the positions (ratio << 1) can only predict a mean energy,
whatever its direct force head does; a conservative model's ratio is 1 by construction.

    ./dens.sh run python benchmarks/energy_sensitivity.py DATA/test RUN/checkpoints/train/best_checkpoint.pt ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fairchem_dens.datasets.lmdb_io import read_lmdb
from fairchem_dens.models.checkpoints import model_from_config, read_checkpoint, strip_ddp_prefix
from fairchem_dens.trainers.guards import is_conservative_model


def energy_sensitivity(checkpoint_path: Path, split: Path, frames: int) -> dict[str, float]:
    from fairchem.core.datasets import data_list_collater

    checkpoint = read_checkpoint(checkpoint_path, allow_pickle=True)
    model = model_from_config(checkpoint["config"]["model"])
    model.load_state_dict(strip_ddp_prefix(checkpoint["state_dict"]))
    model.eval()
    # a gradient head differentiates the energy itself (and frees the graph in eval): read its forces
    conservative = is_conservative_model(model)
    energy_norm = checkpoint["normalizers"]["energy"]
    mean, rmsd = float(energy_norm["mean"]), float(energy_norm["rmsd"])
    predicted, labels, gradient, forces = [], [], [], []
    for data in list(read_lmdb(split))[:frames]:
        batch = data_list_collater([data], otf_graph=True)
        batch.pos.requires_grad_(True)
        with torch.enable_grad():
            out = model(batch)
            energy = out["energy"].sum() * rmsd + mean  # eV: the normaliser undone
            if conservative:  # -dE/dx in the forces normaliser's units (the energy's rmsd for these models)
                grad = -out["forces"] * float(checkpoint["normalizers"]["forces"]["rmsd"])
            else:
                (grad,) = torch.autograd.grad(energy, batch.pos)
        predicted.append(float(energy))
        labels.append(float(data.energy))
        gradient.append(-grad.detach())
        forces.append(data.forces.float())
    gradient, forces = torch.cat(gradient), torch.cat(forces)
    predicted, labels = torch.tensor(predicted), torch.tensor(labels)
    return {
        "energy_pred_std_meV": 1000 * float(predicted.std()),
        "energy_label_std_meV": 1000 * float(labels.std()),
        "energy_mae_meV": 1000 * float((predicted - labels).abs().mean()),
        "grad_over_force": float(gradient.abs().mean() / forces.abs().mean()),
        "grad_force_mae_meV_per_A": 1000 * float((gradient - forces).abs().mean()),
        "force_mean_abs_meV_per_A": 1000 * float(forces.abs().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split", type=Path, help="an LMDB split folder (md17-to-lmdb test)")
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--frames", type=int, default=100)
    args = parser.parse_args()
    print(
        "| checkpoint | E pred std / label std (meV) | E MAE (meV) | mean abs(-dE_pred/dx) / mean abs(F) | "
        "MAE of -dE_pred/dx vs F (meV/Å) |"
    )
    print("|---|---|---|---|---|")
    for path in args.checkpoints:
        row = energy_sensitivity(path, args.split, args.frames)
        print(
            f"| {path} | {row['energy_pred_std_meV']:.1f} / {row['energy_label_std_meV']:.1f} | {row['energy_mae_meV']:.1f} "
            f"| {row['grad_over_force']:.3f} | {row['grad_force_mae_meV_per_A']:.1f} (mean abs F {row['force_mean_abs_meV_per_A']:.0f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
