"""How wrong are the labels of a DeNS batch? Relabels corrupted MD17-format frames with GFN2-xTB.

A DeNS batch keeps the ORIGINAL structure's labels: the energy E(x) and, on the atoms that were
not displaced, the forces F(x), while the model sees the corrupted positions x + noise. At
x + noise the true labels differ by about the Hessian times the noise. This script draws the
corruption of the MD17 recipe (the core's ``sample_corruption``: 25 % of a structure's atoms,
fixed sigma) for each sigma, relabels x + noise with the same GFN2-xTB (tblite) the data were
made with (or, with ``--emt``, .aselmdb frames such as the EMT bulk data with ASE's EMT), and
prints the mean absolute difference between the kept labels and the true ones: energy (meV), forces of the atoms that were not displaced (meV/Å, per component, the quantity
a DeNS batch still trains on), and the noise itself. Compare them with a model's test errors:
where the label error exceeds the model's, the DeNS batches feed it labels worse than what it
already knows.

    ./dens.sh run python benchmarks/dens_label_mismatch.py examples/ethanol_gfn2xtb_500K.npz --frames 60
    ./dens.sh run python benchmarks/dens_label_mismatch.py --emt BULK/aselmdb/train/data.aselmdb --corrupt-ratio 0.5
"""

from __future__ import annotations

import argparse

import numpy as np
import tblite.ase  # noqa: F401  before torch: torch's bundled libgomp is older than the one tblite needs
import torch
from ase import Atoms

from fairchem_dens.core.corruption import sample_corruption
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.datasets.md17 import KCAL_PER_MOL_IN_EV
from fairchem_dens.datasets.xtb_md17 import gfn2_xtb_calculator

EV_TO_MEV = 1000.0


def relabel(atoms: Atoms, positions: np.ndarray, calculator) -> tuple[float, np.ndarray]:
    moved = atoms.copy()
    moved.positions = positions
    moved.calc = calculator
    return float(moved.get_potential_energy()), moved.get_forces()


def mismatch(
    frames: list[tuple[Atoms, float, np.ndarray]], calculator, sigma: float, ratio: float, seed: int
) -> dict[str, float]:
    """Mean |kept label - true label at x + noise| over the frames (structure, energy, forces), for one sigma."""
    config = DeNSConfig.from_optim(
        {
            "use_denoising_pos": True,
            "denoising_pos_coefficient": 5.0,
            "denoising_pos_params": {
                "prob": 1.0,
                "fixed_noise_std": True,
                "std": sigma,
                "corrupt_ratio": ratio,
                "selection": "structure",
            },
        }
    )
    decision, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    energy_errors, per_atom_errors, clean_force_errors, noise_sizes = [], [], [], []
    for atoms, label_energy, label_forces in frames:
        n = len(atoms)
        draw = sample_corruption(config, torch.zeros(n, dtype=torch.long), torch.zeros(n), decision, noise_gen)
        mask = draw.mask.numpy()
        if not mask.any() or mask.all():  # no atom kept its force label
            continue
        energy, forces = relabel(atoms, atoms.positions + draw.noise.numpy().astype(np.float64), calculator)
        energy_errors.append(abs(energy - label_energy))
        per_atom_errors.append(energy_errors[-1] / n)
        clean_force_errors.append(np.abs(forces[~mask] - label_forces[~mask]).ravel())
        noise_sizes.append(np.abs(draw.noise.numpy()[mask]).ravel())
    return {
        "sigma_A": sigma,
        "structures": len(energy_errors),
        "energy_label_error_meV": EV_TO_MEV * float(np.mean(energy_errors)),
        "energy_per_atom_label_error_meV": EV_TO_MEV * float(np.mean(per_atom_errors)),
        "clean_atom_force_label_error_meV_per_A": EV_TO_MEV * float(np.mean(np.concatenate(clean_force_errors))),
        "mean_abs_noise_A": float(np.mean(np.concatenate(noise_sizes))),
    }


def md17_frames(path: str, count: int) -> tuple[list, str]:
    """The first ``count`` frames of an MD17-format .npz (sGDML units, as md17-to-lmdb reads them)."""
    with np.load(path) as data:
        z, positions = data["z"], data["R"][:count]
        energies, forces = data["E"][:count] * KCAL_PER_MOL_IN_EV, data["F"][:count] * KCAL_PER_MOL_IN_EV
    frames = [(Atoms(numbers=z, positions=r), float(e.ravel()[0]), f) for r, e, f in zip(positions, energies, forces)]
    return frames, (
        f"energy std {EV_TO_MEV * energies.std():.1f} meV, force mean |F| {EV_TO_MEV * np.abs(forces).mean():.1f} meV/Å"
    )


def aselmdb_frames(path: str, count: int) -> tuple[list, str]:
    """The first ``count`` frames of an .aselmdb file (e.g. the EMT bulk data), labels as stored."""
    from ase_db_backends.aselmdb import LMDBDatabase

    with LMDBDatabase(path, readonly=True) as database:
        rows = [row for _, row in zip(range(count), database.select())]
    frames = [(row.toatoms(), float(row.energy), np.array(row.forces)) for row in rows]
    per_atom = np.array([energy / len(atoms) for atoms, energy, _ in frames])
    forces = np.concatenate([f for _, _, f in frames])
    return frames, (
        f"energy per atom std {EV_TO_MEV * per_atom.std():.1f} meV/atom, "
        f"force mean |F| {EV_TO_MEV * np.abs(forces).mean():.1f} meV/Å"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data",
        help="an MD17-format .npz of make-xtb-md17 (R in Å; E, F in kcal/mol as sGDML), "
        "or with --emt an .aselmdb of EMT-labelled frames (make-emt-data --bulk)",
    )
    parser.add_argument("--emt", action="store_true", help="relabel with ASE's EMT instead of GFN2-xTB")
    parser.add_argument("--frames", type=int, default=60, help="frames relabelled per sigma (the first n)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.025, 0.05, 0.1])
    parser.add_argument("--corrupt-ratio", type=float, default=0.25, help="the MD17 recipe's (the bulk configs': 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.emt:
        from ase.calculators.emt import EMT

        (frames, spread), calculator = aselmdb_frames(args.data, args.frames), EMT()
    else:
        (frames, spread), calculator = md17_frames(args.data, args.frames), gfn2_xtb_calculator()
    print(f"{args.data}: {len(frames)} frames, corrupt ratio {args.corrupt_ratio}; label spread: {spread}")
    print(
        "| sigma (Å) | corrupted structures | mean abs noise (Å) | energy label error (meV; meV/atom) | "
        "clean-atom force label error (meV/Å) |"
    )
    print("|---|---|---|---|---|")
    for sigma in args.sigmas:
        row = mismatch(frames, calculator, sigma, args.corrupt_ratio, args.seed)
        print(
            f"| {sigma:g} | {row['structures']} | {row['mean_abs_noise_A']:.4f} | {row['energy_label_error_meV']:.1f}; "
            f"{row['energy_per_atom_label_error_meV']:.1f} | {row['clean_atom_force_label_error_meV_per_A']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
