"""A small MPtrj-like bulk data set made with ASE's EMT calculator: energy, forces and stress.

Periodic fcc supercells of the seven metals EMT has parameters for, each strained
(a random symmetric strain, every component within ±3 %) and rattled, plus frames
of short Langevin MD at several temperatures. Every frame carries its energy (eV),
forces (eV/Å) and stress (eV/Å³, ASE's convention: σ = (1/V) ∂E/∂ε, so a
compressed cell has negative diagonal stress; stored as the full 3×3 tensor, Voigt
order xx, yy, zz, yz, xz, xy where a 6-vector is printed).

Written twice, in the layouts materials users hold:

* ``<out>/aselmdb/<split>/data.aselmdb`` — fairchem's ``ase_db`` layout (the format
  of MPtrj and OMat24), read with ``a2g_args: {r_energy, r_forces, r_stress}``
  through :class:`fairchem_dens.datasets.ase_db.DeNSAseDBDataset` (fairchem 1.10) or
  fairchem 2's ``ase_db`` format; each row's data holds its ``md`` flag;
* ``<out>/lmdb/<split>/data.lmdb`` — fairchem LMDB entries with ``stress`` (1, 3, 3) and
  ``md`` (0 for the strained starting frame of a family, 1 for its MD frames).

Each split folder has ``metadata.npz`` (``natoms``) for fairchem's load balancing.
Splits are by structure family (metal, supercell, strain draw), so MD frames of one
family never land in two splits.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from fairchem_dens.datasets.emt_data import METALS, atoms_to_data
from fairchem_dens.datasets.lmdb_io import write_lmdb, write_metadata
from fairchem_dens.emt_labels import emt_labelled
from fairchem_dens.files import publish

__all__ = ["SUPERCELLS", "TEMPERATURES_K", "generate_bulk_dataset", "write_aselmdb"]

logger = logging.getLogger(__name__)

#: Repeats of the 4-atom cubic fcc cell: 4, 8 and 16 atoms.
SUPERCELLS = ((1, 1, 1), (2, 1, 1), (2, 2, 1))
MAX_STRAIN = 0.03
RATTLE_STD = 0.05  # Å
TEMPERATURES_K = (300.0, 600.0, 1200.0)
MD_TIMESTEP_FS = 2.0
MD_STEPS_PER_FRAME = 5
MD_FRICTION = 0.02
DEFAULT_SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}
LAYOUTS = ("aselmdb", "lmdb")


def _family(metal: str, repeat: tuple[int, int, int], md_frames: int, rng: np.random.Generator) -> list[Atoms]:
    """A strained, rattled supercell and the MD frames that start from it."""
    atoms = bulk(metal, "fcc", cubic=True).repeat(repeat)
    strain = rng.uniform(-MAX_STRAIN, MAX_STRAIN, size=(3, 3))
    strain = (strain + strain.T) / 2
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.positions += rng.normal(0.0, RATTLE_STD, size=atoms.positions.shape)
    frames = [emt_labelled(atoms)]
    if md_frames:
        temperature = float(rng.choice(TEMPERATURES_K))
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        dynamics = Langevin(
            atoms, MD_TIMESTEP_FS * units.fs, temperature_K=temperature, friction=MD_FRICTION, rng=rng, logfile=None
        )
        for _ in range(md_frames):
            dynamics.run(MD_STEPS_PER_FRAME)
            frames.append(emt_labelled(atoms))
    return frames


def write_aselmdb(frames: list[Atoms], path: str | Path, md: list[int] | None = None) -> None:
    """Writes labelled frames to an ``.aselmdb`` file (ASE database on LMDB) and ``metadata.npz``.

    ``md``: each frame's MD flag, stored in the row's data (fairchem 2's ASE datasets put a row's
    data into ``atoms.info``, where :class:`fairchem_dens.fairchem2.datasets.DeNSAseDBDataset` reads it).
    """
    from ase_db_backends.aselmdb import LMDBDatabase

    path = Path(path)
    path.unlink(missing_ok=True)
    with LMDBDatabase(path, use_lock_file=False) as database:
        for index, atoms in enumerate(frames):
            database.write(atoms, data=None if md is None else {"md": int(md[index])})
    Path(str(path) + "-lock").unlink(missing_ok=True)
    write_metadata(path.parent, (len(atoms) for atoms in frames))


def _check_arguments(families_per_metal: int, md_frames: int, splits: dict[str, float], layouts: tuple) -> None:
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if not layouts or unknown:
        raise ValueError(f"layouts must be some of {LAYOUTS}, got {tuple(layouts)}")
    if "lmdb" in layouts:
        try:  # the LMDB entries are fairchem 1's Data objects, made by its AtomsToGraphs
            import fairchem.core.preprocessing  # noqa: F401
        except ImportError as error:
            raise ValueError(
                "the lmdb layout needs fairchem-core 1.x (fairchem.core.preprocessing); with fairchem 2 "
                "write only the aselmdb layout (make-emt-data --bulk --layout aselmdb)"
            ) from error
    if families_per_metal < 1:
        raise ValueError(f"families_per_metal must be positive, got {families_per_metal}")
    if md_frames < 0:
        raise ValueError(f"md_frames must be >= 0, got {md_frames}")
    if not splits or any(not fraction > 0 for fraction in splits.values()):
        raise ValueError(f"splits must map split names to positive fractions, got {splits}")
    families = families_per_metal * len(METALS)
    if families < len(splits):
        raise ValueError(f"{families} structure families cannot fill the {len(splits)} splits {list(splits)}")


def generate_bulk_dataset(
    out_dir: str | Path,
    *,
    families_per_metal: int = 6,
    md_frames: int = 4,
    seed: int = 0,
    splits: dict[str, float] | None = None,
    layouts: tuple[str, ...] = LAYOUTS,
) -> dict[str, dict[str, Path]]:
    """Generates the bulk data set in both layouts.

    Args:
        out_dir: output folder (``aselmdb/<split>/``, ``lmdb/<split>/``, ``dataset.json``).
        families_per_metal: strained supercells per metal (cycling through :data:`SUPERCELLS`).
        md_frames: Langevin MD frames after the strained start of each family.
        seed: seed of every draw.
        splits: fractions of families per split (default 0.7/0.15/0.15); each split gets one at least.
        layouts: which of :data:`LAYOUTS` to write (``lmdb`` needs fairchem-core 1.x).

    Returns:
        ``{layout: {split: folder}}`` for each written layout.

    The folders appear only when complete (written in a temporary folder, then renamed).
    """
    out_dir = Path(out_dir)
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    layouts = tuple(layouts)
    _check_arguments(families_per_metal, md_frames, splits, layouts)
    rng = np.random.default_rng(seed)
    families = [(metal, SUPERCELLS[i % len(SUPERCELLS)]) for metal in METALS for i in range(families_per_metal)]
    order = rng.permutation(len(families))
    names = list(splits)
    fractions = np.array([splits[n] for n in names])
    cuts = (np.cumsum(fractions)[:-1] / fractions.sum() * (len(order) - len(names))).astype(int)
    assignment = {name: [int(order[i])] for i, name in enumerate(names)}
    for name, part in zip(names, np.split(order[len(names) :], cuts)):
        assignment[name].extend(int(f) for f in part)

    frames_of = {
        fid: _family(metal, repeat, md_frames, np.random.default_rng([seed, fid]))
        for fid, (metal, repeat) in enumerate(families)
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bulk-staging-", dir=out_dir))
    summary: dict[str, Any] = {}
    try:
        for split, members in assignment.items():
            frames = [(fid, i, atoms) for fid in sorted(members) for i, atoms in enumerate(frames_of[fid])]
            if "aselmdb" in layouts:
                (staging / "aselmdb" / split).mkdir(parents=True)
                write_aselmdb(
                    [atoms for _, _, atoms in frames],
                    staging / "aselmdb" / split / "data.aselmdb",
                    md=[int(i > 0) for _, i, _ in frames],
                )
            if "lmdb" in layouts:
                (staging / "lmdb" / split).mkdir(parents=True)
                entries = [atoms_to_data(atoms, fid, i, md=int(i > 0), stress=True) for fid, i, atoms in frames]
                write_lmdb(entries, staging / "lmdb" / split / "data.lmdb")
            summary[split] = {
                "families": sorted(members),
                "frames": len(frames),
                "atoms": int(sum(len(a) for _, _, a in frames)),
            }
        description = {
            "generator": "fairchem_dens.datasets.emt_bulk.generate_bulk_dataset",
            "calculator": "ase.calculators.emt.EMT",
            "units": {
                "energy": "eV (total)",
                "forces": "eV/Å",
                "stress": "eV/Å³, ASE sign (σ = (1/V) dE/dε)",
                "positions": "Å",
            },
            "seed": seed,
            "families_per_metal": families_per_metal,
            "md_frames": md_frames,
            "max_strain": MAX_STRAIN,
            "rattle_std_A": RATTLE_STD,
            "temperatures_K": list(TEMPERATURES_K),
            "families": {str(fid): {"metal": m, "repeat": list(r)} for fid, (m, r) in enumerate(families)},
            "splits": summary,
        }
        (staging / "dataset.json").write_text(json.dumps(description, indent=2, ensure_ascii=False))
        publish(staging, out_dir, [*layouts, "dataset.json"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("EMT bulk data written to %s", out_dir)
    return {layout: {split: out_dir / layout / split for split in assignment} for layout in layouts}
