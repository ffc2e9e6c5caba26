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

import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import BFGS

from fairchem_dens.datasets.lmdb_io import write_lmdb
from fairchem_dens.files import publish

__all__ = [
    "ADSORBATES",
    "DEFAULT_SPLITS",
    "METALS",
    "atoms_to_data",
    "build_system",
    "generate_emt_dataset",
]

logger = logging.getLogger(__name__)

#: Metals EMT has parameters for.
METALS = ("Cu", "Ni", "Pd", "Ag", "Pt", "Au", "Al")
#: Adsorbates built from EMT's non-metal elements (H, C, N, O).
ADSORBATES = ("O", "N", "H", "C", "OH", "CO")
DEFAULT_SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}
#: Name of the extra split holding every system of ``holdout_adsorbate``.
OOD_SPLIT = "ood"

SITES = {"111": ("fcc", "hcp", "ontop"), "100": ("hollow", "ontop", "bridge")}
#: Bond lengths (Å) of the diatomic adsorbates, bound through their first atom.
_BONDS = {"OH": 0.97, "CO": 1.15}

SLAB_SIZE = (2, 2, 3)  # 12 slab atoms: 13-14 atoms per structure keeps EquiformerV2 fast on CPU
VACUUM = 7.0  # Å on each side of the slab
ADSORBATE_HEIGHT = 1.6  # Å above the top layer
RATTLE_STD = 0.15  # Å, so the relaxation starts away from the minimum, as OC20's do
BFGS_STEPS_PER_FRAME = 3
BFGS_FMAX = 0.02  # eV/Å; a loose OC20-like criterion, rarely met within the few steps taken
MD_TIMESTEP_FS = 2.0
MD_STEPS_PER_FRAME = 5
MD_FRICTION = 0.02  # ASE units
MD_TEMPERATURE_K = 600.0  # hot enough to sample well away from the relaxed geometry


def _adsorbate(name: str) -> Atoms:
    """The adsorbate molecule, standing upright with its binding atom at the origin."""
    if name in _BONDS:
        return Atoms(name, positions=[(0.0, 0.0, 0.0), (0.0, 0.0, _BONDS[name])])
    return Atoms(name)


def build_system(metal: str, facet: str, adsorbate: str, site: str) -> Atoms:
    """A 2x2x3 slab with an adsorbate, bottom layer fixed, OC20 tags.

    Args:
        metal: one of :data:`METALS`.
        facet: ``"111"`` or ``"100"``.
        adsorbate: one of :data:`ADSORBATES`.
        site: an ``add_adsorbate`` site of the facet (see ``SITES``).

    Returns:
        The structure, with ``pbc`` True, a ``FixAtoms`` constraint on the bottom
        layer and tags 0 (fixed slab), 1 (free slab), 2 (adsorbate).
    """
    builder = fcc111 if facet == "111" else fcc100
    slab = builder(metal, size=SLAB_SIZE, vacuum=VACUUM, periodic=True)
    # ase tags layers 1 (top) .. 3 (bottom); OC20 uses 0 fixed slab, 1 free slab, 2 adsorbate.
    layer = slab.get_tags()
    add_adsorbate(slab, _adsorbate(adsorbate), height=ADSORBATE_HEIGHT, position=site)
    tags = np.full(len(slab), 2)
    tags[: len(layer)] = np.where(layer == layer.max(), 0, 1)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.pbc = True  # periodic in z too, as OC20 (the vacuum keeps images apart)
    return slab


@functools.lru_cache(maxsize=2)
def _converter(stress: bool = False):
    # Imported lazily: fairchem pulls in torch_geometric and friends (~1 s), which
    # callers that only build structures do not need.
    from fairchem.core.preprocessing import AtomsToGraphs

    return AtomsToGraphs(
        r_energy=True, r_forces=True, r_stress=stress, r_fixed=True, r_distances=False, r_edges=False, r_pbc=True
    )


def atoms_to_data(atoms: Atoms, sid: int, fid: int, md: int, stress: bool = False):
    """One LMDB entry: a PyG ``Data`` as fairchem's S2EF LMDBs hold it.

    Args:
        atoms: a structure with a calculator (EMT) attached.
        sid: system id.
        fid: frame index within the system.
        md: 1 for an MD frame, 0 for a relaxation (or strained starting) frame.
        stress: also store the calculator's stress (``stress``, (1, 3, 3), eV/Å³).

    Returns:
        ``Data`` with ``pos``, ``cell`` (1, 3, 3), ``atomic_numbers``, ``natoms``,
        ``tags``, ``fixed``, ``pbc`` (1, 3), ``energy`` (float, eV), ``forces``
        (N, 3 float32, eV/Å), ``sid``, ``fid`` and ``md`` (and ``stress``).
    """
    data = _converter(stress).convert(atoms)
    # fairchem 1.10's AtomsToGraphs already stores unconstrained forces as `forces`;
    # set them explicitly anyway, since OC20 keeps the forces of fixed atoms.
    data.forces = torch.tensor(atoms.get_forces(apply_constraint=False), dtype=torch.float32)
    data.energy = float(atoms.get_potential_energy(apply_constraint=False))
    data.sid = int(sid)
    data.fid = int(fid)
    data.md = int(md)
    # One row per structure after collation, like `cell`: fairchem's radius_graph_pbc
    # reads `pbc[:, i]` per structure, which a flat (3 * batch,) vector would defeat.
    data.pbc = data.pbc.view(1, 3)
    return data


def _snapshot(atoms: Atoms, md: int) -> tuple[Atoms, int]:
    """A labelled copy of ``atoms``: the copy keeps constraints and tags, not the calculator."""
    frame = atoms.copy()
    frame.calc = EMT()
    frame.get_potential_energy()
    return frame, md


def _relaxation_frames(atoms: Atoms, n_frames: int) -> list[tuple[Atoms, int]]:
    """Snapshots every few BFGS steps, the first one the starting geometry; relaxes ``atoms``."""
    optimizer = BFGS(atoms, logfile=None)
    frames = []
    for _ in range(n_frames):
        frames.append(_snapshot(atoms, md=0))
        optimizer.run(fmax=BFGS_FMAX, steps=BFGS_STEPS_PER_FRAME)
    return frames


def _md_frames(atoms: Atoms, n_frames: int, temperature_k: float, rng: np.random.Generator) -> list[tuple[Atoms, int]]:
    """Snapshots every few steps of Langevin MD from ``atoms``' geometry."""
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    dynamics = Langevin(
        atoms, MD_TIMESTEP_FS * units.fs, temperature_K=temperature_k, friction=MD_FRICTION, rng=rng, logfile=None
    )
    frames = []
    for _ in range(n_frames):
        dynamics.run(MD_STEPS_PER_FRAME)
        frames.append(_snapshot(atoms, md=1))
    return frames


def _frames(atoms: Atoms, relax_frames: int, md_frames: int, temperature_k: float, rng) -> list[tuple[Atoms, int]]:
    """Relaxation frames from a rattled start, then MD frames from where it ended."""
    system = atoms.copy()
    free = system.get_tags() > 0
    system.positions[free] += rng.normal(0.0, RATTLE_STD, size=(int(free.sum()), 3))
    system.calc = EMT()
    frames = _relaxation_frames(system, relax_frames)
    # A fresh calculator for the MD: reusing the relaxation's EMT (and its neighbour list)
    # sums in another order, changing energies in the last bits from earlier releases' data.
    system = system.copy()
    system.calc = EMT()
    return frames + _md_frames(system, md_frames, temperature_k, rng)


def _draw_systems(n_systems: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Metal, facet, adsorbate and site of each system.

    Facets alternate and adsorbates cycle, so every adsorbate appears once
    ``n_systems >= len(ADSORBATES)``; metals and sites are random.
    """
    systems = []
    for index in range(n_systems):
        facet = "111" if index % 2 == 0 else "100"
        site = str(rng.choice(SITES[facet]))  # drawn before the metal: keeps the data of earlier releases
        metal = METALS[rng.integers(len(METALS))]
        systems.append({"metal": metal, "facet": facet, "adsorbate": ADSORBATES[index % len(ADSORBATES)], "site": site})
    return systems


def _assign_splits(
    systems: list[dict[str, Any]], splits: dict[str, float], holdout: str | None, rng: np.random.Generator
) -> dict[str, list[int]]:
    """System ids per split: holdout systems to ``ood``, the rest shuffled by fraction, >= 1 each."""
    pool = [sid for sid, system in enumerate(systems) if system["adsorbate"] != holdout]
    names = list(splits)
    if len(pool) < len(names):
        raise ValueError(f"{len(pool)} systems (besides any held out) cannot fill the {len(names)} splits {names}")
    assignment: dict[str, list[int]] = {name: [] for name in names}
    if holdout is not None:
        assignment[OOD_SPLIT] = [sid for sid, system in enumerate(systems) if system["adsorbate"] == holdout]
        if not assignment[OOD_SPLIT]:
            raise ValueError(
                f"holdout_adsorbate {holdout!r} occurs in none of the {len(systems)} systems; "
                f"adsorbates cycle through {ADSORBATES}, so raise n_systems"
            )
    order = [pool[i] for i in rng.permutation(len(pool))]
    # One system per split first, so that no split is empty, then the rest by fraction.
    for name, sid in zip(names, order):
        assignment[name].append(sid)
    rest = np.array(order[len(names) :], dtype=int)
    fractions = np.array([splits[name] for name in names], dtype=float)
    cuts = (np.cumsum(fractions)[:-1] / fractions.sum() * len(rest)).astype(int)
    for name, part in zip(names, np.split(rest, cuts)):
        assignment[name].extend(int(sid) for sid in part)
    return {name: sorted(sids) for name, sids in assignment.items()}


def _check_arguments(n_systems, relax_frames, md_frames, splits, holdout_adsorbate) -> None:
    """Fails early, before any EMT work, on arguments that cannot give a sensible data set."""
    if n_systems < 1:
        raise ValueError(f"n_systems must be positive, got {n_systems}")
    if relax_frames < 0 or md_frames < 0 or relax_frames + md_frames == 0:
        raise ValueError(f"need relax_frames, md_frames >= 0 and at least one frame, got {relax_frames}, {md_frames}")
    if not splits or any(not fraction > 0 for fraction in splits.values()):
        raise ValueError(f"splits must map split names to positive fractions, got {splits}")
    if holdout_adsorbate is not None:
        if holdout_adsorbate not in ADSORBATES:
            raise ValueError(f"holdout_adsorbate must be one of {ADSORBATES}, got {holdout_adsorbate!r}")
        if OOD_SPLIT in splits:
            raise ValueError(f"split name {OOD_SPLIT!r} is reserved for holdout_adsorbate's systems")


def _previous_splits(out_dir: Path) -> list[str]:
    """Split names recorded by an earlier run in ``out_dir`` (none if there was none)."""
    try:
        return list(json.loads((out_dir / "dataset.json").read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _description(params: dict[str, Any], systems, assignment, natoms) -> dict[str, Any]:
    """Contents of dataset.json: what was generated, how, and in which units."""
    return {
        "generator": "fairchem_dens.datasets.emt_data.generate_emt_dataset",
        "calculator": "ase.calculators.emt.EMT",
        "format": "fairchem lmdb: <split>/data.lmdb (pickled torch_geometric Data) + <split>/metadata.npz (natoms)",
        "units": {"energy": "eV (total EMT energy)", "forces": "eV/Å (unconstrained)", "positions": "Å"},
        "fields": [
            "pos",
            "cell",
            "atomic_numbers",
            "natoms",
            "tags",
            "fixed",
            "pbc",
            "energy",
            "forces",
            "sid",
            "fid",
            "md",
        ],
        "conventions": {
            "tags": "0 fixed slab atom, 1 free slab atom, 2 adsorbate",
            "fixed": "1 for the bottom slab layer (FixAtoms), else 0",
            "md": "0 relaxation frame, 1 MD frame",
        },
        **params,
        "relaxation": {"optimizer": "BFGS", "rattle_std_A": RATTLE_STD, "steps_per_frame": BFGS_STEPS_PER_FRAME},
        "md": {
            "integrator": "Langevin",
            "timestep_fs": MD_TIMESTEP_FS,
            "steps_per_frame": MD_STEPS_PER_FRAME,
            "friction": MD_FRICTION,
            "temperature_K": MD_TEMPERATURE_K,
        },
        "systems": {str(sid): system for sid, system in enumerate(systems)},
        "splits": {
            split: {"systems": sids, "frames": len(natoms[split]), "atoms": int(sum(natoms[split]))}
            for split, sids in assignment.items()
        },
    }


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
        out_dir: output folder; each split goes to ``out_dir/<split>/`` (``data.lmdb``
            and ``metadata.npz``), and a description to ``out_dir/dataset.json``.
        n_systems: number of adsorbate/slab systems.
        relax_frames: relaxation frames per system (``md = 0``).
        md_frames: MD frames per system (``md = 1``).
        seed: seed of everything random (systems, splits, rattling, MD).
        splits: fractions of systems per split (default train/val/test 0.7/0.15/0.15);
            every split gets at least one system.
        holdout_adsorbate: systems with this adsorbate go to an extra ``ood`` split only.

    Returns:
        The folder of each split, ``ood`` included when ``holdout_adsorbate`` is given.

    Raises:
        ValueError: on arguments that leave a split empty or are out of range.

    The folders appear only when complete: everything is written in a temporary
    folder inside ``out_dir`` and renamed into place, so an interrupted run leaves
    no half-written split. Existing splits of the same names are replaced.
    """
    out_dir = Path(out_dir)
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    _check_arguments(n_systems, relax_frames, md_frames, splits, holdout_adsorbate)
    rng = np.random.default_rng(seed)
    systems = _draw_systems(n_systems, rng)
    assignment = _assign_splits(systems, splits, holdout_adsorbate, rng)

    frames_of = {}
    for sid, system in enumerate(systems):
        atoms = build_system(system["metal"], system["facet"], system["adsorbate"], system["site"])
        # A generator per system: its frames do not depend on how many systems came before.
        system_rng = np.random.default_rng([seed, sid])
        frames_of[sid] = _frames(atoms, relax_frames, md_frames, MD_TEMPERATURE_K, system_rng)
        logger.info(
            "EMT system %d/%d: %s(%s) + %s, %d frames",
            sid + 1,
            n_systems,
            system["metal"],
            system["facet"],
            system["adsorbate"],
            len(frames_of[sid]),
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".emt-staging-", dir=out_dir))
    try:
        natoms = {}
        for split, sids in assignment.items():
            entries = [
                atoms_to_data(atoms, sid, fid, md) for sid in sids for fid, (atoms, md) in enumerate(frames_of[sid])
            ]
            (staging / split).mkdir()
            write_lmdb(entries, staging / split / "data.lmdb")
            natoms[split] = [int(data.natoms) for data in entries]
            logger.info("EMT split %s: %d systems, %d frames", split, len(sids), len(entries))
        params = {
            "seed": seed,
            "n_systems": n_systems,
            "relax_frames": relax_frames,
            "md_frames": md_frames,
            "split_fractions": splits,
            "holdout_adsorbate": holdout_adsorbate,
        }
        description = _description(params, systems, assignment, natoms)
        (staging / "dataset.json").write_text(json.dumps(description, indent=2, ensure_ascii=False))
        # Splits of an earlier run that this one no longer has go too (only folders that hold our LMDB).
        stale = [
            name
            for name in _previous_splits(out_dir)
            if name not in assignment and (out_dir / name / "data.lmdb").is_file()
        ]
        publish(staging, out_dir, [*assignment, "dataset.json"], retire=stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("EMT data set written to %s", out_dir)
    return {split: out_dir / split for split in assignment}
