"""MD17 / revised MD17 ``.npz`` files to fairchem LMDBs (train/val/test).

Reads the sGDML layout of MD17 (keys ``z``, ``R``, ``E``, ``F``) and the layout of
the revised MD17 (rMD17: ``nuclear_charges``, ``coords``, ``energies``,
``forces``); both hold energies in kcal/mol and forces in kcal/mol/Å, which are
converted to eV and eV/Å, the units of every fairchem data set. Frames are split
with ``numpy.random.default_rng(seed).permutation`` (seed 1 by default, the split
of Equiformer and TorchMD-Net) into ``n_train`` / ``n_val`` / the rest as test.

Each frame becomes one PyG ``Data`` entry as fairchem's S2EF LMDBs hold it, made by
fairchem's own :class:`~fairchem.core.preprocessing.AtomsToGraphs`. Molecules are
not periodic: entries carry ``pbc = [False, False, False]`` and a nominal 50 Å
cubic cell (fairchem's collation and models expect a ``cell``). The box puts
periodic images farther than any usual cutoff from an MD17 molecule (at most
~10 Å across), so a model with ``use_pbc: True`` builds exactly the molecular
graph. The shipped MD17 configs do that: fairchem's non-periodic path calls PyG's
``radius_graph``, which needs torch-cluster or pyg-lib (not installed by default).

Output layout (``out_dir``)::

    train/data.lmdb  train/metadata.npz
    val/data.lmdb    val/metadata.npz
    test/data.lmdb   test/metadata.npz
    splits.npz       # source frame indices of each split, in permutation order
    md17_info.json   # provenance, units, split sizes, train-split statistics

A split too large for one LMDB file of :func:`~fairchem_dens.datasets.lmdb_io.write_lmdb`
(whose map size is 1 GiB: we put up to ~219,000 MD17 entries in one) is written as
``data.0000.lmdb``, ``data.0001.lmdb``, ... in the same folder, which fairchem's
``lmdb`` format reads in sorted order as one data set (the test splits of most
full MD17 molecules, e.g. ethanol's 554,092 frames).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from fairchem_dens.datasets.lmdb_io import LMDB_MAP_SIZE, write_lmdb
from fairchem_dens.errors import FairchemDensError
from fairchem_dens.files import replace_dir, sha256_file, staging_dir

__all__ = [
    "convert_md17",
    "load_md17",
    "split_indices",
    "frame_to_data",
    "MD17Frames",
    "MD17FormatError",
    "KCAL_PER_MOL_IN_EV",
    "MD17_LAYOUTS",
]

logger = logging.getLogger(__name__)

#: 1 kcal/mol in eV (0.0433641...), as ASE defines it; applied to energies and forces.
KCAL_PER_MOL_IN_EV = float(units.kcal / units.mol)

#: Key of each quantity in the two known layouts, in the order numbers, positions, energies, forces.
MD17_LAYOUTS: dict[str, dict[str, str]] = {
    "sgdml": {"numbers": "z", "positions": "R", "energies": "E", "forces": "F"},
    "rmd17": {"numbers": "nuclear_charges", "positions": "coords", "energies": "energies", "forces": "forces"},
}

#: Edge of the nominal cubic cell of every entry, in Å (see the module docstring).
MOLECULE_CELL = 50.0

SPLITS = ("train", "val", "test")

#: Fraction of ``LMDB_MAP_SIZE`` (the map of every ``write_lmdb`` file) a shard may fill by our estimate:
#: 1 GiB held 259,214 one-page entries when measured (98.9%), so 0.85 leaves room for the B-tree and keeps aspirin's test split whole.
_MAP_FILL = 0.85
#: Entries per LMDB file; ``None`` derives it from the size of one pickled entry. Tests lower it.
MAX_ENTRIES_PER_LMDB: int | None = None


class MD17FormatError(FairchemDensError, ValueError):
    """An ``.npz`` file is not a usable MD17 / rMD17 file; the message names the file and key."""


@dataclass(frozen=True)
class MD17Frames:
    """The frames of one MD17 file, in the file's units (Å, kcal/mol, kcal/mol/Å).

    Attributes:
        numbers: ``[n_atoms]`` atomic numbers.
        positions: ``[n_frames, n_atoms, 3]`` positions in Å.
        energies: ``[n_frames]`` energies in kcal/mol.
        forces: ``[n_frames, n_atoms, 3]`` forces in kcal/mol/Å.
        layout: ``sgdml`` or ``rmd17``.
        name: the ``name`` stored in the file, if any.
        extra: other scalar string entries of the file (``theory``, ...).
    """

    numbers: np.ndarray
    positions: np.ndarray
    energies: np.ndarray
    forces: np.ndarray
    layout: str
    name: str | None
    extra: dict[str, str]

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])


# ----------------------------------------------------------------------------- reading


def _detect_layout(path: Path, keys: set[str]) -> str:
    """The layout whose keys are all present; else an error naming the missing ones."""
    for layout, names in MD17_LAYOUTS.items():
        if set(names.values()) <= keys:
            return layout
    missing = {layout: sorted(set(names.values()) - keys) for layout, names in MD17_LAYOUTS.items()}
    raise MD17FormatError(
        f"{path}: not an MD17 file: missing keys {missing['sgdml']} of the sGDML layout (z, R, E, F) "
        f"and {missing['rmd17']} of the rMD17 layout (nuclear_charges, coords, energies, forces); "
        f"the file holds {sorted(keys)}"
    )


def _scalar_string(value: np.ndarray) -> str | None:
    """The text of a 0-d (or 1-element) string array, else ``None``."""
    if value.dtype.kind not in "US" or value.size != 1:
        return None
    item = value.reshape(()).item()
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


def _string_entries(archive, used: set[str]) -> dict[str, str]:
    """Scalar string entries of the archive beyond the data keys (``name``, ``theory``, ...)."""
    strings = {}
    for key in sorted(set(archive.files) - used):
        try:
            value = archive[key]
        except ValueError:  # an object array would need pickle, which we never enable
            continue
        text = _scalar_string(value)
        if text is not None:
            strings[key] = text
    return strings


def _check_shapes(path: Path, keys: dict[str, str], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validates shapes and values; returns the arrays with energies flattened to ``[n_frames]``."""
    numbers, positions = arrays["numbers"], arrays["positions"]
    energies, forces = arrays["energies"], arrays["forces"]
    if numbers.ndim != 1 or numbers.size == 0 or numbers.dtype.kind not in "iu":
        raise MD17FormatError(
            f"{path}: key {keys['numbers']!r} must be a non-empty 1-d integer array, "
            f"got shape {numbers.shape} dtype {numbers.dtype}"
        )
    if numbers.min() < 1 or numbers.max() > 118:
        raise MD17FormatError(f"{path}: key {keys['numbers']!r} holds atomic numbers outside 1..118")
    n_atoms = numbers.shape[0]
    if positions.ndim != 3 or positions.shape[1:] != (n_atoms, 3):
        raise MD17FormatError(
            f"{path}: key {keys['positions']!r} has shape {positions.shape}, expected "
            f"(n_frames, {n_atoms}, 3) for the {n_atoms} atoms of {keys['numbers']!r}"
        )
    n_frames = positions.shape[0]
    if forces.shape != positions.shape:
        raise MD17FormatError(
            f"{path}: key {keys['forces']!r} has shape {forces.shape} but {keys['positions']!r} "
            f"has shape {positions.shape}"
        )
    # sGDML stores E as [n_frames, 1]; rMD17 as [n_frames].
    if energies.shape not in ((n_frames,), (n_frames, 1)):
        raise MD17FormatError(
            f"{path}: key {keys['energies']!r} has shape {energies.shape}, expected ({n_frames},) "
            f"or ({n_frames}, 1) for the {n_frames} frames of {keys['positions']!r}"
        )
    energies = energies.reshape(n_frames)
    for quantity, array in (("positions", positions), ("energies", energies), ("forces", forces)):
        if array.dtype.kind not in "fiu":
            raise MD17FormatError(f"{path}: key {keys[quantity]!r} has non-numeric dtype {array.dtype}")
        finite = np.isfinite(array).reshape(n_frames, -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise MD17FormatError(
                f"{path}: key {keys[quantity]!r} holds non-finite values in {bad.size} frame(s), "
                f"first at frame {int(bad[0])}"
            )
    return {"numbers": numbers, "positions": positions, "energies": energies, "forces": forces}


def load_md17(npz_path: str | Path) -> MD17Frames:
    """Reads and validates an sGDML MD17 or rMD17 ``.npz`` file (units unchanged).

    Args:
        npz_path: the ``.npz`` file.

    Returns:
        The frames, in kcal/mol and kcal/mol/Å as stored.

    Raises:
        FileNotFoundError: the file does not exist.
        MD17FormatError: not an ``.npz`` archive, neither layout's keys are all
            present, or shapes/values are inconsistent (the message names the key).
    """
    path = Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"MD17 file not found: {path}")
    try:
        # allow_pickle=False: an .npz from the internet must not run code when read.
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise MD17FormatError(f"{path}: cannot read as an .npz archive ({type(error).__name__}: {error})") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy file loads as one array
        raise MD17FormatError(f"{path}: not an .npz archive (a single {type(archive).__name__})")
    with archive:
        layout = _detect_layout(path, set(archive.files))
        keys = MD17_LAYOUTS[layout]
        try:
            arrays = {quantity: np.asarray(archive[key]) for quantity, key in keys.items()}
        except (OSError, ValueError, zipfile.BadZipFile) as error:  # truncated member, object array
            raise MD17FormatError(f"{path}: cannot read the data keys {sorted(keys.values())} ({error})") from error
        strings = _string_entries(archive, set(keys.values()))
    arrays = _check_shapes(path, keys, arrays)
    name = strings.pop("name", None)
    return MD17Frames(
        numbers=arrays["numbers"].astype(np.int64),
        positions=arrays["positions"],
        energies=arrays["energies"],
        forces=arrays["forces"],
        layout=layout,
        name=name,
        extra=strings,
    )


# ----------------------------------------------------------------------------- splitting and entries


def split_indices(n_frames: int, n_train: int, n_val: int, seed: int) -> dict[str, np.ndarray]:
    """Source frame indices of each split, in the order of one seeded permutation.

    ``default_rng(seed).permutation(n_frames)`` cut into ``[:n_train]``,
    ``[n_train:n_train + n_val]`` and the rest, as Equiformer / TorchMD-Net do.
    """
    perm = np.random.default_rng(seed).permutation(n_frames).astype(np.int64)
    return {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}


def _converter():
    from fairchem.core.preprocessing import AtomsToGraphs

    # No edges: fairchem builds graphs on the fly (otf_graph), with the model's own cutoff.
    return AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_edges=False, r_pbc=True)


def frame_atoms(frames: MD17Frames, index: int) -> Atoms:
    """Frame ``index`` as labelled ASE atoms (eV, eV/Å) in the nominal molecule box, pbc off."""
    atoms = Atoms(
        numbers=frames.numbers,
        positions=frames.positions[index],
        cell=np.eye(3) * MOLECULE_CELL,
        pbc=False,
    )
    atoms.set_tags(np.ones(frames.n_atoms, dtype=int))  # every atom free: 1 as OC20's free atoms
    energy = float(frames.energies[index]) * KCAL_PER_MOL_IN_EV
    forces = np.asarray(frames.forces[index], dtype=np.float64) * KCAL_PER_MOL_IN_EV
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    atoms.info["sid"] = int(index)  # the frame in the source file
    return atoms


def frame_to_data(converter, frames: MD17Frames, index: int):
    """One LMDB entry (eV, eV/Å) for frame ``index`` of ``frames``."""
    atoms = frame_atoms(frames, index)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    data = converter.convert(atoms)
    data.energy = energy  # a Python float, as in fairchem's S2EF LMDBs
    data.forces = torch.tensor(forces, dtype=torch.float32)
    data.sid = int(index)  # the frame in the source file, so predictions can be traced back
    data.fid = 0
    data.pbc = data.pbc.view(1, 3)  # one row per structure after collation, like `cell`
    return data


def _entries(frames: MD17Frames, indices: np.ndarray) -> Iterator:
    """Entries made one at a time, so that a split of 200,000 frames never sits in memory."""
    converter = _converter()
    for index in indices:
        yield frame_to_data(converter, frames, int(index))


def _entries_per_lmdb(frames: MD17Frames) -> int:
    """How many entries one LMDB file of ``write_lmdb`` can safely hold."""
    if MAX_ENTRIES_PER_LMDB is not None:
        return int(MAX_ENTRIES_PER_LMDB)
    sample = pickle.dumps(frame_to_data(_converter(), frames, 0), protocol=-1)
    # An entry over ~2 KB takes whole 4 KiB overflow pages; allow for the B-tree besides.
    page = 4096
    per_entry = page * math.ceil((len(sample) + 64) / page) + 64
    return max(1, int(LMDB_MAP_SIZE * _MAP_FILL // per_entry))


def _write_split(folder: Path, frames: MD17Frames, indices: np.ndarray, per_file: int | None) -> list[str]:
    """Writes one split's LMDB file(s) and ``metadata.npz``; returns the file names.

    ``per_file`` None: one ``data.aselmdb`` (fairchem 2's ``ase_db`` format) instead.
    """
    folder.mkdir()
    if per_file is None:
        from fairchem_dens.datasets.emt_bulk import write_aselmdb

        write_aselmdb([frame_atoms(frames, int(index)) for index in indices], folder / "data.aselmdb")
        return ["data.aselmdb"]
    if len(indices) <= per_file:
        write_lmdb(_entries(frames, indices), folder / "data.lmdb", metadata=True)
        return ["data.lmdb"]
    names = []
    for shard, start in enumerate(range(0, len(indices), per_file)):
        name = f"data.{shard:04d}.lmdb"  # zero-padded: fairchem reads a folder's LMDBs in sorted order
        write_lmdb(_entries(frames, indices[start : start + per_file]), folder / name, metadata=False)
        names.append(name)
        logger.info(
            "MD17 %s: wrote %s (%d/%d entries)", folder.name, name, min(start + per_file, len(indices)), len(indices)
        )
    # One metadata.npz for the folder; every MD17 frame has the same atoms.
    np.savez(folder / "metadata.npz", natoms=np.full(len(indices), frames.n_atoms, dtype=np.int64))
    return names


def _train_statistics(frames: MD17Frames, train: np.ndarray) -> dict[str, float]:
    """Energy mean/std and force RMSD of the train split in eV, for the normalizers of a config."""
    energies = frames.energies[train].astype(np.float64) * KCAL_PER_MOL_IN_EV
    forces = frames.forces[train].astype(np.float64) * KCAL_PER_MOL_IN_EV
    return {
        "energy_mean": float(energies.mean()),
        "energy_std": float(energies.std()),
        "energy_per_atom_mean": float(energies.mean() / frames.n_atoms),
        "forces_rmsd": float(np.sqrt(np.mean(forces**2))),
        "forces_mean": float(forces.mean()),
    }


# ----------------------------------------------------------------------------- conversion


def _check_arguments(n_train: int, n_val: int, seed: int) -> None:
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _info(path: Path, frames: MD17Frames, molecule: str, seed: int, splits: dict, files: dict) -> dict:
    return {
        "source_path": str(path.resolve()),
        "source_sha256": sha256_file(path),
        "format": frames.layout,
        "source_keys": MD17_LAYOUTS[frames.layout],
        "source_metadata": frames.extra,
        "molecule": molecule,
        "n_frames": frames.n_frames,
        "n_atoms": frames.n_atoms,
        "atomic_numbers": frames.numbers.tolist(),
        "units": {"energy": "eV", "forces": "eV/Å", "positions": "Å"},
        "source_units": {"energy": "kcal/mol", "forces": "kcal/mol/Å", "positions": "Å"},
        "kcal_per_mol_to_eV": KCAL_PER_MOL_IN_EV,
        "conversion": "ase.units.kcal / ase.units.mol, applied to energies and forces",
        "seed": seed,
        "split_method": "numpy.random.default_rng(seed).permutation(n_frames): train, val, test in that order",
        "split_sizes": {split: int(len(indices)) for split, indices in splits.items()},
        "lmdb_files": files,
        "train_statistics": _train_statistics(frames, splits["train"]),
        "cell": f"nominal cubic {MOLECULE_CELL} Å, pbc False; no periodic image lies within a usual cutoff",
        "entries": "sid = source frame index, fid = 0, tags = 1, fixed = 0",
    }


def convert_md17(
    npz_path: str | Path,
    out_dir: str | Path,
    *,
    n_train: int = 950,
    n_val: int = 50,
    seed: int = 1,
    molecule: str | None = None,
    overwrite: bool = False,
    aselmdb: bool = False,
) -> dict[str, Path]:
    """Converts an MD17 / rMD17 ``.npz`` file into fairchem LMDBs with a seeded split.

    Args:
        npz_path: sGDML MD17 (``z``, ``R``, ``E``, ``F``) or rMD17
            (``nuclear_charges``, ``coords``, ``energies``, ``forces``) file; Å,
            kcal/mol and kcal/mol/Å.
        out_dir: output folder (``train``/``val``/``test`` sub-folders,
            ``splits.npz``, ``md17_info.json``); it appears only when complete.
        n_train: training frames (950 in the Equiformer / TorchMD-Net setting).
        n_val: validation frames; all remaining frames form the test split.
        seed: seed of ``numpy.random.default_rng(seed).permutation(n_frames)``.
        molecule: name recorded in ``md17_info.json`` (default: the file's
            ``name`` entry, else the file name without extension).
        overwrite: replace an existing ``out_dir``.
        aselmdb: write each split as one ``data.aselmdb`` (an ASE database on LMDB, fairchem 2's
            ``ase_db`` format) instead of fairchem 1's LMDB entries.

    Returns:
        ``{"train": folder, "val": folder, "test": folder}``, the split folders
        inside ``out_dir``, each a src for fairchem's ``lmdb`` format.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false (checked first).
        FileNotFoundError: ``npz_path`` does not exist.
        MD17FormatError: the file is unusable (missing keys, inconsistent shapes,
            non-finite values) or has fewer than ``n_train + n_val + 1`` frames.
        ValueError: invalid ``n_train`` / ``n_val`` / ``seed``.
    """
    path, out_dir = Path(npz_path), Path(out_dir)
    if not aselmdb:
        from fairchem_dens.versions import require_fairchem

        require_fairchem("fairchem1", "md17-to-lmdb's fairchem-1 LMDB entries (pass --aselmdb for fairchem 2's format)")
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    _check_arguments(n_train, n_val, seed)
    if overwrite and out_dir.exists() and path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"{path} lies inside {out_dir}, which overwrite=True would delete")
    frames = load_md17(path)
    needed = n_train + n_val + 1  # at least one test frame
    if frames.n_frames < needed:
        raise MD17FormatError(
            f"{path}: key {MD17_LAYOUTS[frames.layout]['positions']!r} holds {frames.n_frames} frames, "
            f"fewer than n_train + n_val + 1 = {needed}"
        )
    splits = split_indices(frames.n_frames, n_train, n_val, seed)
    molecule = molecule or frames.name or path.stem
    per_file = None if aselmdb else _entries_per_lmdb(frames)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out_dir)
    try:
        files = {}
        for split in SPLITS:
            files[split] = _write_split(staging / split, frames, splits[split], per_file)
            logger.info("MD17 %s: %s split, %d frames", molecule, split, len(splits[split]))
        np.savez(staging / "splits.npz", **splits)
        info = _info(path, frames, molecule, seed, splits, files)
        (staging / "md17_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed conversion leaves nothing behind
        raise
    return {split: out_dir / split for split in SPLITS}
