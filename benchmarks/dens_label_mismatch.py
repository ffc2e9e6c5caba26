"""How wrong are the labels of a DeNS batch? Relabels corrupted MD17-format frames with GFN2-xTB.

A DeNS batch keeps the ORIGINAL structure's labels: the energy E(x) and, on the atoms that were
not displaced, the forces F(x), while the model sees the corrupted positions x + noise. At
x + noise the true labels differ by about the Hessian times the noise. This script draws the
corruption of the MD17 recipe (the core's ``sample_corruption``: 25 % of a structure's atoms,
fixed sigma) for each sigma, relabels x + noise with the same GFN2-xTB (tblite) the data were
made with, and prints the mean absolute difference between the kept labels and the true ones:
energy (meV), forces of the atoms that were not displaced (meV/Å, per component, the quantity
a DeNS batch still trains on), and the noise itself. Compare them with a model's test errors:
where the label error exceeds the model's, the DeNS batches feed it labels worse than what it
already knows.

    ./dens.sh run python benchmarks/dens_label_mismatch.py examples/ethanol_gfn2xtb_500K.npz --frames 60
"""

from __future__ import annotations

import argparse

import tblite.ase  # noqa: F401  before torch: torch's bundled libgomp is older than the one tblite needs

import numpy as np
import torch
from ase import Atoms

from fairchem_dens.core.corruption import sample_corruption
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.datasets.md17 import KCAL_PER_MOL_IN_EV
from fairchem_dens.datasets.xtb_md17 import gfn2_xtb_calculator

EV_TO_MEV = 1000.0


def relabel(numbers: np.ndarray, positions: np.ndarray, calculator) -> tuple[float, np.ndarray]:
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.calc = calculator
    return float(atoms.get_potential_energy()), atoms.get_forces()


def mismatch(npz: dict, frames: list[int], sigma: float, ratio: float, seed: int) -> dict[str, float]:
    """Mean |kept label - true label at x + noise| over the frames, for one sigma."""
    config = DeNSConfig.from_optim({"use_denoising_pos": True, "denoising_pos_coefficient": 5.0,
                                    "denoising_pos_params": {"prob": 1.0, "fixed_noise_std": True, "std": sigma,
                                                             "corrupt_ratio": ratio, "selection": "structure"}})
    decision, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    calculator = gfn2_xtb_calculator()
    energy_errors, clean_force_errors, noise_sizes, corrupted = [], [], [], 0
    for frame in frames:
        numbers, positions = npz["z"], npz["R"][frame]
        n = len(numbers)
        draw = sample_corruption(config, torch.zeros(n, dtype=torch.long), torch.zeros(n), decision, noise_gen)
        mask = draw.mask.numpy()
        if not mask.any():
            continue
        corrupted += 1
        energy, forces = relabel(numbers, positions + draw.noise.numpy().astype(np.float64), calculator)
        energy_errors.append(abs(energy - float(npz["E"][frame].ravel()[0])))
        clean_force_errors.append(np.abs(forces[~mask] - npz["F"][frame][~mask]).ravel())
        noise_sizes.append(np.abs(draw.noise.numpy()[mask]).ravel())
    return {
        "sigma_A": sigma,
        "structures": corrupted,
        "energy_label_error_meV": EV_TO_MEV * float(np.mean(energy_errors)),
        "clean_atom_force_label_error_meV_per_A": EV_TO_MEV * float(np.mean(np.concatenate(clean_force_errors))),
        "mean_abs_noise_A": float(np.mean(np.concatenate(noise_sizes))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", help="an MD17-format .npz of make-xtb-md17 (R in Å; E, F in kcal/mol as sGDML)")
    parser.add_argument("--frames", type=int, default=60, help="frames relabelled per sigma (the first n)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.025, 0.05, 0.1])
    parser.add_argument("--corrupt-ratio", type=float, default=0.25, help="the MD17 recipe's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with np.load(args.npz) as data:  # sGDML units, as md17-to-lmdb reads them: kcal/mol and kcal/mol/Å
        npz = {"R": data["R"], "z": data["z"], "E": data["E"] * KCAL_PER_MOL_IN_EV, "F": data["F"] * KCAL_PER_MOL_IN_EV}
    frames = list(range(min(args.frames, len(npz["R"]))))
    print(f"{args.npz}: {len(frames)} frames, {len(npz['z'])} atoms, corrupt ratio {args.corrupt_ratio}; "
          f"label spread: energy std {EV_TO_MEV * npz['E'].std():.1f} meV, "
          f"force mean |F| {EV_TO_MEV * np.abs(npz['F']).mean():.1f} meV/Å")
    print("| sigma (Å) | corrupted structures | mean abs noise (Å) | energy label error (meV) | "
          "clean-atom force label error (meV/Å) |")
    print("|---|---|---|---|---|")
    for sigma in args.sigmas:
        row = mismatch(npz, frames, sigma, args.corrupt_ratio, args.seed)
        print(f"| {sigma:g} | {row['structures']} | {row['mean_abs_noise_A']:.4f} | {row['energy_label_error_meV']:.1f} "
              f"| {row['clean_atom_force_label_error_meV_per_A']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
