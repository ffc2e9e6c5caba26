"""S2EF predictions of a fairchem-2 model, in the prediction-file layout the submission builder reads.

fairchem 1's ``--mode predict`` writes ``s2ef_predictions.npz`` (``ids`` ``"{sid}_{fid}"``,
``energy``, ``forces`` of the free atoms concatenated, ``chunk_idx``); fairchem 2 has no such
mode, only its predict unit. This module runs an inference checkpoint through fairchem 2's own
``load_predict_unit`` over an ASE database split (``.aselmdb`` / ``.db``) and writes that file,
so ``fairchem-dens make-submission`` builds the same checked archive from a fairchem-2 model
as from a fairchem-1 one::

    fairchem-dens predict-s2ef RUN/checkpoints/final/inference_ckpt.pt test_id/ --task-name oc20 \\
        --out id/s2ef_predictions.npz
    fairchem-dens make-submission s2ef oc20 --id id/s2ef_predictions.npz ... --out submission.npz

A structure's id is ``"{sid}_{fid}"`` from the row's ``sid`` / ``fid`` (``atoms.info``, the row's
key-value pairs or its ``data``), as OC20's S2EF entries carry them; a row without ``sid`` gets
its row number, without ``fid`` 0. Forces of fixed atoms (``FixAtoms``) are left out, as
fairchem 1 leaves them out of S2EF predictions.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms

from fairchem_dens.errors import FairchemDensError
from fairchem_dens.files import atomic_write

__all__ = ["PredictionError", "database_files", "predict_s2ef", "predict_structures", "read_structures"]

DATABASE_SUFFIXES = (".aselmdb", ".db")


class PredictionError(FairchemDensError, ValueError):
    """The input of ``predict-s2ef`` is unusable (named in the message)."""


def database_files(src: Path) -> list[Path]:
    """``src`` if it is a file, else the ASE databases (:data:`DATABASE_SUFFIXES`) in the folder ``src``,
    sorted; empty if there are none."""
    if src.is_file():
        return [src]
    return sorted(p for p in src.iterdir() if p.suffix in DATABASE_SUFFIXES) if src.is_dir() else []


def _databases(src: Path) -> list[Path]:
    files = database_files(src)
    if not files:
        raise PredictionError(f"{src}: not an ASE database ({', '.join(DATABASE_SUFFIXES)}) nor a folder holding one")
    return files


def _label(row, atoms: Atoms, key: str):
    for source in (atoms.info, row.key_value_pairs, row.data):
        if key in source:
            return int(source[key])
    return None


def read_structures(src: str | Path) -> Iterator[tuple[str, Atoms]]:
    """``("{sid}_{fid}", atoms)`` of every row of the database(s) at ``src``, in file and row order."""
    import ase.db

    number = 0
    for path in _databases(Path(src)):
        with ase.db.connect(str(path), readonly=True) if path.suffix == ".db" else _aselmdb(path) as database:
            for row in database.select():
                atoms = row.toatoms()
                sid, fid = _label(row, atoms, "sid"), _label(row, atoms, "fid")
                yield f"{number if sid is None else sid}_{0 if fid is None else fid}", atoms
                number += 1


def _aselmdb(path: Path):
    from ase_db_backends.aselmdb import LMDBDatabase

    return LMDBDatabase(path, readonly=True)


def _free_atoms(atoms: Atoms) -> np.ndarray:
    free = np.ones(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            free[constraint.index] = False
    return free


def predict_structures(
    checkpoint: str | Path, structures: list[Atoms], *, task_name: str, batch_size: int = 16, device: str = "cpu"
) -> list[dict[str, np.ndarray]]:
    """Each structure's predictions (``energy``, ``forces``, and ``stress`` 3×3 where the model has it).

    Runs the inference checkpoint through fairchem 2's own ``load_predict_unit``, in batches.
    """
    from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch
    from fairchem.core.units.mlip_unit import load_predict_unit

    unit = load_predict_unit(str(checkpoint), "batch", device=device)
    if task_name not in unit.dataset_to_tasks:
        raise PredictionError(f"--task-name {task_name!r}: the model knows {sorted(unit.dataset_to_tasks)}")
    results = []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        batch = atomicdata_list_to_batch([AtomicData.from_ase(atoms, task_name=task_name) for atoms in chunk])
        predicted = {key: value.detach().cpu() for key, value in unit.predict(batch.to(device)).items()}
        per_atom = torch.split(predicted["forces"], [len(atoms) for atoms in chunk])
        for index, forces in enumerate(per_atom):
            result = {"energy": float(predicted["energy"].view(-1)[index]), "forces": forces.numpy()}
            if "stress" in predicted:
                result["stress"] = predicted["stress"].view(len(chunk), 3, 3)[index].numpy()
            results.append(result)
    return results


def predict_s2ef(
    checkpoint: str | Path,
    src: str | Path,
    out: str | Path,
    *,
    task_name: str,
    batch_size: int = 16,
    device: str = "cpu",
) -> Path:
    """Writes ``out`` (an S2EF prediction file) from the predictions of ``checkpoint`` on ``src``.

    Args:
        checkpoint: a fairchem-2 inference checkpoint (``inference_ckpt.pt``, ours or any).
        src: an ASE database file or a folder of them.
        out: the ``.npz`` to write (refused if it exists; written atomically).
        task_name: the model's task (dataset) name, as the ASE calculator takes it.
        batch_size: structures per forward.
        device: ``cpu`` or ``cuda``.
    """
    out = Path(out)
    if out.exists():
        raise PredictionError(f"{out} exists: choose another --out or move it away")
    if not Path(checkpoint).is_file():
        raise PredictionError(f"{checkpoint}: no such checkpoint file")
    structures = list(read_structures(src))
    if not structures:
        raise PredictionError(f"{src}: the database holds no structures")
    ids, energies, forces, counts = [], [], [], []
    atoms_list = [atoms for _, atoms in structures]
    for (name, atoms), predicted in zip(
        structures,
        predict_structures(checkpoint, atoms_list, task_name=task_name, batch_size=batch_size, device=device),
    ):
        free = _free_atoms(atoms)
        ids.append(name)
        energies.append(predicted["energy"])
        forces.append(predicted["forces"][free])
        counts.append(int(free.sum()))
    with atomic_write(out) as temp:
        with open(temp, "wb") as file:
            np.savez_compressed(
                file,
                ids=np.array(ids),
                energy=np.array(energies, dtype=np.float32),
                forces=np.concatenate(forces).astype(np.float32),
                chunk_idx=np.cumsum(counts)[:-1],
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairchem-dens predict-s2ef", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a fairchem-2 inference checkpoint (inference_ckpt.pt)")
    parser.add_argument("src", help="an ASE database (.aselmdb, .db) or a folder of them")
    parser.add_argument("--out", required=True, help="the s2ef_predictions.npz to write")
    parser.add_argument("--task-name", required=True, help="the model's task (dataset) name, e.g. oc20, omat")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        path = predict_s2ef(
            args.checkpoint,
            args.src,
            args.out,
            task_name=args.task_name,
            batch_size=args.batch_size,
            device=args.device,
        )
    except PredictionError as error:
        raise SystemExit(f"predict-s2ef: {error}") from error
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
