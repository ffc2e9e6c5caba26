"""A small OC20-like S2EF data set made with ASE's EMT calculator.

Adsorbates on fcc(111) and fcc(100) slabs with the bottom layer fixed, tagged as in
OC20 (0 fixed slab, 1 free slab, 2 adsorbate), labelled with EMT energies and
forces (forces *without* the constraint applied, so fixed atoms carry forces as in
OC20). Each system contributes frames along a short relaxation (``md = 0``) and a
short Langevin MD run (``md = 1``). Splits are by system; one adsorbate can be held
out entirely as an out-of-distribution split. Written as fairchem LMDBs (one folder
per split with ``data.lmdb`` and ``metadata.npz``), read by fairchem's ``lmdb`` format.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import lmdb
import numpy as np
import torch
from ase import Atoms, units
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import BFGS

__all__ = ["generate_emt_dataset", "atoms_to_data", "write_lmdb", "ADSORBATES", "METALS"]

METALS = ("Cu", "Ni", "Pd", "Ag", "Pt", "Au", "Al")
ADSORBATES = ("O", "N", "H", "C", "OH", "CO")
DEFAULT_SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _adsorbate(name: str) -> Atoms:
    if name == "OH":
        return Atoms("OH", positions=[(0, 0, 0), (0, 0, 0.97)])
    if name == "CO":
        return Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)])
    return Atoms(name) if len(name) == 1 else molecule(name)


def build_system(metal: str, facet: str, adsorbate: str, site: str) -> Atoms:
    """A 2x2x3 slab with an adsorbate, bottom layer fixed, OC20 tags."""
    builder = fcc111 if facet == "111" else fcc100
    slab = builder(metal, size=(2, 2, 3), vacuum=7.0, periodic=True)
    # ase tags layers 1 (top) .. 3 (bottom); OC20 uses 0 fixed slab, 1 free slab, 2 adsorbate.
    layer = slab.get_tags()
    add_adsorbate(slab, _adsorbate(adsorbate), height=1.6, position=site)
    tags = np.full(len(slab), 2)
    tags[: len(layer)] = np.where(layer == layer.max(), 0, 1)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.pbc = True
    return slab


def atoms_to_data(atoms: Atoms, sid: int, fid: int, md: int):
    """One LMDB entry: a PyG ``Data`` as fairchem's S2EF LMDBs hold it."""
    from fairchem.core.preprocessing import AtomsToGraphs

    converter = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_edges=False, r_pbc=True)
    data = converter.convert(atoms)
    # Unconstrained forces: OC20 keeps the forces of fixed atoms in its data.
    data.forces = torch.tensor(atoms.get_forces(apply_constraint=False), dtype=torch.float32)
    data.energy = float(atoms.get_potential_energy())
    data.sid = int(sid)
    data.fid = int(fid)
    data.md = int(md)
    data.pbc = data.pbc.view(1, 3)  # one row per structure after collation, like `cell`
    return data


def write_lmdb(data_objects: Iterable, path: Path, metadata: bool = True) -> int:
    """Writes entries under keys ``"0"``, ``"1"``, ... plus ``length``; returns the count.

    Args:
        data_objects: PyG ``Data`` entries.
        path: the ``.lmdb`` file to write.
        metadata: also write ``metadata.npz`` (atoms per entry) beside it, which
            fairchem's load-balancing sampler needs.
    """
    path = Path(path)
    env = lmdb.open(str(path), subdir=False, map_size=1 << 30, meminit=False, map_async=True)
    natoms = []
    with env.begin(write=True) as txn:
        for data in data_objects:
            txn.put(f"{len(natoms)}".encode("ascii"), pickle.dumps(data, protocol=-1))
            natoms.append(int(data.natoms))
        txn.put("length".encode("ascii"), pickle.dumps(len(natoms), protocol=-1))
    env.sync()
    env.close()
    if metadata:
        np.savez(path.parent / "metadata.npz", natoms=np.array(natoms, dtype=np.int64))
    return len(natoms)


def _frames(atoms: Atoms, relax_frames: int, md_frames: int, rng: np.random.Generator):
    """Relaxation snapshots then MD snapshots of one system: (atoms copy, md flag)."""
    free = atoms.get_tags() > 0
    start = atoms.copy()
    start.positions[free] += rng.normal(0.0, 0.15, size=(int(free.sum()), 3))
    start.calc = EMT()
    frames = []

    def snapshot(md: int, system: Atoms) -> None:
        copy = system.copy()
        copy.calc = EMT()
        copy.get_potential_energy()
        frames.append((copy, md))

    optimizer = BFGS(start, logfile=None)
    for _ in range(relax_frames):
        snapshot(0, start)
        optimizer.run(fmax=0.02, steps=3)
    system = start.copy()
    system.calc = EMT()
    MaxwellBoltzmannDistribution(system, temperature_K=600, rng=rng)
    dynamics = Langevin(system, 2.0 * units.fs, temperature_K=600, friction=0.02, rng=rng, logfile=None)
    for _ in range(md_frames):
        dynamics.run(5)
        snapshot(1, system)
    return frames


def _systems(n_systems: int, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    systems = []
    for index in range(n_systems):
        facet = "111" if index % 2 == 0 else "100"
        site = rng.choice(["fcc", "hcp", "ontop"]) if facet == "111" else rng.choice(["hollow", "ontop", "bridge"])
        systems.append((METALS[rng.integers(len(METALS))], facet, ADSORBATES[index % len(ADSORBATES)], str(site)))
    return systems


def _assign_splits(systems, splits: dict[str, float], holdout: str | None, rng) -> dict[str, list[int]]:
    pool = [i for i, system in enumerate(systems) if system[2] != holdout]
    assignment = {name: [] for name in splits}
    if holdout is not None:
        assignment["ood"] = [i for i, system in enumerate(systems) if system[2] == holdout]
    order = [pool[i] for i in rng.permutation(len(pool))]
    names = list(splits)
    if len(order) < len(names):
        raise ValueError(f"{len(order)} systems cannot fill the {len(names)} splits {names}")
    # one system per split first, then the rest by the requested fractions
    for name, index in zip(names, order):
        assignment[name].append(index)
    rest = order[len(names):]
    cuts = np.cumsum([splits[n] for n in names])[:-1] / sum(splits.values())
    for name, part in zip(names, np.split(np.array(rest, dtype=int), (cuts * len(rest)).astype(int))):
        assignment[name].extend(int(i) for i in part)
    return assignment


def generate_emt_dataset(
    out_dir: str | Path,
    *,
    n_systems: int = 8,
    relax_frames: int = 4,
    md_frames: int = 4,
    seed: int = 0,
    splits: dict[str, float] | None = None,
    holdout_adsorbate: str | None = None,
) -> dict[str, Path]:
    """Generates the data set and returns ``{split: folder}``.

    Args:
        out_dir: output folder; each split goes to ``out_dir/<split>/``.
        n_systems: number of adsorbate/slab systems.
        relax_frames: relaxation frames per system (``md = 0``).
        md_frames: MD frames per system (``md = 1``).
        seed: seed of everything random (systems, rattling, MD).
        splits: fractions of systems per split (default train/val/test 0.7/0.15/0.15).
        holdout_adsorbate: systems with this adsorbate go to an extra ``ood`` split only.

    The folders appear only when complete: each is written in a temporary folder
    and renamed into place, so an interrupted run leaves no half-written split.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = dict(splits or DEFAULT_SPLITS)
    if holdout_adsorbate is not None and holdout_adsorbate not in ADSORBATES:
        raise ValueError(f"holdout_adsorbate must be one of {ADSORBATES}, got {holdout_adsorbate!r}")
    rng = np.random.default_rng(seed)
    systems = _systems(n_systems, rng)
    assignment = _assign_splits(systems, splits, holdout_adsorbate, rng)
    frames_of = {}
    for sid, system in enumerate(systems):
        atoms = build_system(*system)
        frames_of[sid] = _frames(atoms, relax_frames, md_frames, np.random.default_rng([seed, sid]))
        logging.info("EMT system %d/%d: %s(%s) + %s, %d frames", sid + 1, n_systems, *system[:3], len(frames_of[sid]))
    folders, counts = {}, {}
    for split, sids in assignment.items():
        entries = [atoms_to_data(atoms, sid, fid, md) for sid in sorted(sids) for fid, (atoms, md) in enumerate(frames_of[sid])]
        staging = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=out_dir))
        write_lmdb(entries, staging / "data.lmdb")
        final = out_dir / split
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        folders[split], counts[split] = final, len(entries)
    description = {
        "generator": "fairchem_dens.datasets.emt_data.generate_emt_dataset",
        "calculator": "ase.calculators.emt.EMT",
        "units": {"energy": "eV (total EMT energy)", "forces": "eV/Å (unconstrained)", "positions": "Å"},
        "seed": seed,
        "n_systems": n_systems,
        "relax_frames": relax_frames,
        "md_frames": md_frames,
        "holdout_adsorbate": holdout_adsorbate,
        "systems": {sid: {"metal": s[0], "facet": s[1], "adsorbate": s[2], "site": s[3]} for sid, s in enumerate(systems)},
        "splits": {split: {"systems": sorted(assignment[split]), "frames": counts[split]} for split in assignment},
    }
    (out_dir / "dataset.json").write_text(json.dumps(description, indent=2))
    return folders
