"""MD17-format trajectories of small molecules labelled with GFN2-xTB (``tblite``).

MD17 itself is DFT (PBE+vdW-TS) molecular dynamics at 500 K, stored by sGDML as an
``.npz`` with ``z`` (atomic numbers), ``R`` (Å), ``E`` (kcal/mol) and ``F`` (kcal/mol/Å).
This module makes files of the same layout from a real semi-empirical calculator, so
the MD17 recipes, ``fairchem-dens md17-to-lmdb`` and the accuracy study run on data
that behaves like MD17 (thermal sampling of one molecule) without downloading anything:
Langevin dynamics driven by GFN2-xTB, one frame every ``stride`` steps after an
equilibration, labels of the sampled frames from the same calculation.

MD17's training frames are a few hundred drawn at random from a trajectory of hundreds of
picoseconds (ethanol: 950 of ~555,000 frames over ~277 ps), so neighbouring training frames
are far apart in time. The default here keeps one frame every 200 steps of 0.5 fs (100 fs;
1500 frames span 150 ps), far enough apart that a test frame is no interpolation between
training frames 5 fs away (docs/data.md#how-far-apart-the-frames-are). The npz's ``theory``
records the spacing and the time span.

    fairchem-dens make-xtb-md17 ethanol data/xtb/ethanol.npz --frames 1500
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

from fairchem_dens.files import atomic_write

__all__ = [
    "DEFAULT_STRIDE",
    "MOLECULES",
    "build_parser",
    "generate_xtb_trajectory",
    "gfn2_xtb_calculator",
    "write_sgdml_npz",
    "main",
]

logger = logging.getLogger(__name__)

#: MD steps between kept frames by default: 200 x 0.5 fs = 100 fs (MD17 draws its frames
#: at random from a trajectory hundreds of ps long; neighbouring 5 fs frames are near copies).
DEFAULT_STRIDE = 200

#: MD17-like molecules and their names in ASE's G2 collection (ASE has no aspirin).
MOLECULES = {
    "ethanol": "CH3CH2OH",
    "acetic_acid": "CH3COOH",
    "acetaldehyde": "CH3CHO",
    "methylamine": "CH3NH2",
    "formic_acid": "HCOOH",
    "benzene": "C6H6",
    "malonaldehyde": "malonaldehyde",  # one of the paper's MD17 molecules; not in G2: _MALONALDEHYDE
}

#: Enol malonaldehyde (C3H4O2, planar, the O-H...O bridge closing a six-ring), a rough start
#: geometry in Å that the GFN2-xTB equilibration relaxes: ASE's G2 collection has no malonaldehyde.
_MALONALDEHYDE = Atoms(
    "C3O2H4",
    positions=[
        (-1.17, -0.675, 0.0),
        (0.0, -1.35, 0.0),
        (1.17, -0.675, 0.0),  # C1 C2 C3
        (-1.17, 0.675, 0.0),
        (1.17, 0.675, 0.0),  # O1 (C=O) O2 (O-H)
        (-2.105, -1.215, 0.0),
        (0.0, -2.43, 0.0),
        (2.105, -1.215, 0.0),  # H on C1 C2 C3
        (0.35, 1.25, 0.0),  # the bridging H, on O2
    ],
)


def _start_geometry(name: str) -> Atoms:
    return _MALONALDEHYDE.copy() if name == "malonaldehyde" else molecule(MOLECULES[name])


def gfn2_xtb_calculator():
    """The GFN2-xTB (tblite) ASE calculator the trajectories are labelled with."""
    try:
        from tblite.ase import TBLite
    except ImportError as error:  # tblite is a requirement of ./dens.sh; a hand-made env may lack it
        raise ImportError("GFN2-xTB labels need `tblite` (pip install tblite)") from error
    return TBLite(method="GFN2-xTB", verbosity=0)


def generate_xtb_trajectory(
    name: str,
    n_frames: int,
    temperature_K: float = 500.0,
    timestep_fs: float = 0.5,
    stride: int = DEFAULT_STRIDE,
    equilibration_steps: int = 500,
    friction_per_fs: float = 0.01,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Runs GFN2-xTB Langevin MD of one molecule and returns MD17 (sGDML) arrays.

    Args:
        name: a key of :data:`MOLECULES`.
        n_frames: frames to keep.
        temperature_K: thermostat temperature (MD17: 500 K).
        timestep_fs: MD time step.
        stride: MD steps between kept frames.
        equilibration_steps: steps run and discarded first.
        friction_per_fs: Langevin friction.
        seed: seed of the initial velocities and of the thermostat's noise.
        progress: called as ``progress(steps_done, steps_total)`` after the equilibration
            and after every kept frame.

    Returns:
        ``{"z", "R", "E", "F", "name", "theory"}`` in Å, kcal/mol and kcal/mol/Å.
    """
    if name not in MOLECULES:
        raise ValueError(f"unknown molecule {name!r}; choose one of {', '.join(MOLECULES)}")
    if n_frames < 1 or stride < 1 or equilibration_steps < 0:
        raise ValueError("n_frames and stride must be >= 1 and equilibration_steps >= 0")
    atoms = _start_geometry(name)
    atoms.calc = gfn2_xtb_calculator()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dynamics = Langevin(
        atoms, timestep_fs * units.fs, temperature_K=temperature_K, friction=friction_per_fs / units.fs, rng=rng
    )
    total = equilibration_steps + n_frames * stride
    dynamics.run(equilibration_steps)
    if progress is not None:
        progress(equilibration_steps, total)
    positions, energies, forces = [], [], []
    for frame in range(n_frames):
        dynamics.run(stride)
        positions.append(atoms.get_positions())
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        if progress is not None:
            progress(equilibration_steps + (frame + 1) * stride, total)
    to_kcal = units.mol / units.kcal  # the inverse of md17.KCAL_PER_MOL_IN_EV
    spacing_fs = timestep_fs * stride
    return {
        "z": atoms.get_atomic_numbers().astype(np.int64),
        "R": np.asarray(positions),
        "E": np.asarray(energies)[:, None] * to_kcal,
        "F": np.asarray(forces) * to_kcal,
        "name": np.array(name),
        "theory": np.array(
            f"GFN2-xTB (tblite), Langevin {temperature_K:g} K, {timestep_fs:g} fs x {stride} = {spacing_fs:g} fs "
            f"between frames, {n_frames * spacing_fs / 1000:g} ps in all after {equilibration_steps * timestep_fs:g} fs "
            f"of equilibration, seed {seed}"
        ),
        "frame_spacing_fs": np.array(spacing_fs),
        "time_span_ps": np.array(n_frames * spacing_fs / 1000),
    }


class ProgressLines:
    """``progress(done, total)`` that prints a line every ``percent`` % with the expected time left."""

    def __init__(self, what: str, percent: float = 5.0, stream=sys.stderr) -> None:
        self.what, self.percent, self.stream = what, percent, stream
        self.start, self.next_percent = None, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.start is None:  # the clock starts at the first report (after the equilibration)
            self.start, self.first = now, done
        share = 100.0 * done / max(total, 1)
        if share + 1e-9 < self.next_percent and done < total:
            return
        self.next_percent = (int(share // self.percent) + 1) * self.percent
        rate = (done - self.first) / (now - self.start) if now > self.start and done > self.first else None
        left = f", about {_duration((total - done) / rate)} left" if rate and done < total else ""
        speed = f" ({rate:.0f} steps/s)" if rate else ""
        print(f"{self.what}: {share:5.1f} % of {total} MD steps{speed}{left}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def write_sgdml_npz(arrays: dict[str, np.ndarray], path: str | Path, overwrite: bool = False) -> Path:
    """Writes sGDML arrays to ``path`` (refuses to replace an existing file unless ``overwrite``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    with atomic_write(path) as temp, open(temp, "wb") as handle:  # a handle: np.savez would add ".npz"
        np.savez(handle, **arrays)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The options of ``fairchem-dens make-xtb-md17`` (parsed without tblite, so ``--help`` works anywhere)."""
    parser = argparse.ArgumentParser(prog="fairchem-dens make-xtb-md17", description=__doc__.splitlines()[0])
    parser.add_argument("molecule", choices=sorted(MOLECULES))
    parser.add_argument("out", help="output .npz")
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--temperature", type=float, default=500.0, help="K (MD17: 500)")
    parser.add_argument(
        "--stride",
        type=int,
        default=DEFAULT_STRIDE,
        help="0.5 fs MD steps between kept frames (default 200: 100 fs apart; MD17's training frames "
        "are drawn from hundreds of ps)",
    )
    parser.add_argument("--equilibration", type=int, default=500, help="MD steps run and discarded first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``fairchem-dens make-xtb-md17``; run by the CLI in an interpreter that imported tblite first."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists; pass --overwrite to replace it")
    try:
        arrays = generate_xtb_trajectory(
            args.molecule,
            args.frames,
            temperature_K=args.temperature,
            stride=args.stride,
            equilibration_steps=args.equilibration,
            seed=args.seed,
            progress=ProgressLines(f"make-xtb-md17 {args.molecule}"),
        )
    except ValueError as error:
        parser.error(str(error))
    write_sgdml_npz(arrays, out, overwrite=args.overwrite)
    print(
        f"wrote {out}: {args.frames} frames, {arrays['theory']}; convert with `fairchem-dens md17-to-lmdb {out} FOLDER`"
    )
    return 0
