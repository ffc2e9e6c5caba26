"""The built-in EMT example: real fairchem LMDBs with OC20 conventions."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from fairchem.core.common.data_parallel import data_list_collater
from fairchem.core.datasets import LmdbDataset

from fairchem_dens.datasets import emt_data as emt
from fairchem_dens.datasets.emt_data import generate_emt_dataset
from fairchem_dens.testing import close_lmdb
from fairchem_dens.testing.tolerances import EMT_ROUNDED_POSITIONS_ENERGY_EV, EMT_ROUNDED_POSITIONS_FORCES_EV_PER_A

TINY = {"n_systems": 3, "relax_frames": 2, "md_frames": 1}


@contextlib.contextmanager
def opened(folder):
    """fairchem's own ``lmdb`` dataset on a split folder, closed afterwards."""
    dataset = LmdbDataset({"src": str(folder)})
    try:
        yield dataset
    finally:
        close_lmdb(dataset)


def entries(folder) -> list:
    with opened(folder) as dataset:
        return [dataset[i] for i in range(len(dataset))]


def adsorbate_of(data) -> str:
    """Chemical formula of the tag-2 atoms, in build order (e.g. ``"OH"``)."""
    numbers = data.atomic_numbers[data.tags == 2].tolist()
    return Atoms(numbers=numbers).get_chemical_formula(mode="all")


@pytest.fixture(scope="module")
def splits(emt_data):
    """Every split of the session's EMT data (8 systems, OH held out), read by fairchem."""
    return {split: entries(folder) for split, folder in emt_data.items()}


def test_split_folders_and_metadata(emt_data):
    assert set(emt_data) == {"train", "val", "test", "ood"}
    for split, folder in emt_data.items():
        assert sorted(p.name for p in folder.iterdir()) == ["data.lmdb", "metadata.npz"]
        natoms = np.load(folder / "metadata.npz")["natoms"]
        with opened(folder) as dataset:
            assert len(dataset) == len(natoms) > 0, split
            # fairchem finds metadata.npz next to the LMDB (what load balancing uses).
            assert dataset.metadata_hasattr("natoms")
            assert list(dataset.get_metadata("natoms", list(range(len(dataset))))) == natoms.tolist()
            assert natoms.tolist() == [int(dataset[i].natoms) for i in range(len(dataset))]
    # no staging folder is left behind
    assert sorted(p.name for p in emt_data["train"].parent.iterdir()) == ["dataset.json", "ood", "test", "train", "val"]


def test_entries_follow_oc20_conventions(splits):
    for data in splits.values():
        for d in data:
            n = int(d.natoms)
            assert 13 <= n <= 16, "small structures: a 2x2x3 slab and an adsorbate"
            assert d.pos.shape == (n, 3) and d.atomic_numbers.shape == (n,)
            assert d.cell.shape == (1, 3, 3) and d.pbc.shape == (1, 3) and bool(d.pbc.all())
            assert isinstance(d.energy, float) and np.isfinite(d.energy)
            assert d.forces.shape == (n, 3) and d.forces.dtype == torch.float32
            assert set(d.tags.tolist()) == {0, 1, 2}
            assert torch.equal(d.tags == 0, d.fixed == 1)  # tag 0 = fixed slab atom
            assert set(d.fixed.tolist()) == {0, 1} and int(d.fixed.sum()) == 4  # one 2x2 layer
            # the fixed layer is the bottom one: below every other atom
            z = d.pos[:, 2]
            assert z[d.fixed == 1].max() < z[d.fixed == 0].min() - 1.0
            # OC20 keeps the (unconstrained) forces of fixed atoms
            assert d.forces[d.fixed == 1].norm(dim=1).min() > 1e-4
            assert int(d.md) in (0, 1) and isinstance(d.sid, int) and isinstance(d.fid, int)


def test_both_frame_kinds_per_system(splits):
    frames = {}
    for data in splits.values():
        for d in data:
            frames.setdefault(d.sid, []).append(d)
    assert len(frames) == 8
    for sid, data in frames.items():
        assert [d.fid for d in data] == list(range(5))  # relax_frames=3 + md_frames=2, in order
        assert [d.md for d in data] == [0, 0, 0, 1, 1]
        relax = [d.energy for d in data if d.md == 0]
        assert relax[-1] < relax[0], f"system {sid}: the relaxation lowers the EMT energy"
        assert len({d.pos.sum().item() for d in data}) == len(data), "frames differ from one another"


def test_labels_are_emt_energies_and_unconstrained_forces(splits):
    d = splits["train"][-1]  # an MD frame
    atoms = Atoms(
        numbers=d.atomic_numbers.numpy(), positions=d.pos.double().numpy(), cell=d.cell[0].double().numpy(), pbc=True
    )
    atoms.calc = EMT()
    assert d.energy == pytest.approx(atoms.get_potential_energy(), abs=EMT_ROUNDED_POSITIONS_ENERGY_EV)
    np.testing.assert_allclose(d.forces.numpy(), atoms.get_forces(), atol=EMT_ROUNDED_POSITIONS_FORCES_EV_PER_A)


def test_splits_are_by_system_and_holdout_only_in_ood(splits, emt_data):
    sids = {split: {d.sid for d in data} for split, data in splits.items()}
    assert all(not (sids[a] & sids[b]) for a in sids for b in sids if a < b)
    assert {adsorbate_of(d) for d in splits["ood"]} == {"OH"}
    for split in ("train", "val", "test"):
        assert "OH" not in {adsorbate_of(d) for d in splits[split]}, split
    info = json.loads((emt_data["train"].parent / "dataset.json").read_text())
    assert info["units"]["energy"].startswith("eV") and info["units"]["forces"].startswith("eV/Å")
    assert info["seed"] == 0 and info["holdout_adsorbate"] == "OH"
    assert {split: s["frames"] for split, s in info["splits"].items()} == {k: len(v) for k, v in splits.items()}
    assert {split: set(s["systems"]) for split, s in info["splits"].items()} == sids


def test_collates_into_a_batch(splits):
    data = splits["train"][:2]
    batch = data_list_collater(data, otf_graph=True)
    n = sum(int(d.natoms) for d in data)
    assert batch.natoms.tolist() == [int(d.natoms) for d in data]
    assert batch.pos.shape == (n, 3) and batch.forces.shape == (n, 3) and batch.fixed.shape == (n,)
    assert batch.energy.shape == (2,) and batch.md.shape == (2,) and batch.sid.shape == (2,)
    assert batch.cell.shape == (2, 3, 3) and batch.pbc.shape == (2, 3)
    assert batch.batch.tolist() == [0] * int(data[0].natoms) + [1] * int(data[1].natoms)


def test_deterministic_per_seed(tmp_path):
    a = generate_emt_dataset(tmp_path / "a", seed=3, **TINY)
    b = generate_emt_dataset(tmp_path / "b", seed=3, **TINY)
    c = generate_emt_dataset(tmp_path / "c", seed=4, **TINY)
    for split in a:
        first, second = entries(a[split]), entries(b[split])
        assert len(first) == len(second) > 0
        assert all(
            torch.equal(x.pos, y.pos) and x.energy == y.energy and torch.equal(x.forces, y.forces)
            for x, y in zip(first, second)
        )

    def energies(folders):
        return sorted(d.energy for folder in folders.values() for d in entries(folder))

    assert energies(a) != energies(c)


def test_custom_splits_get_at_least_one_system(tmp_path):
    folders = generate_emt_dataset(tmp_path, splits={"train": 0.9, "val": 0.05, "test": 0.05}, **TINY)
    assert [len({d.sid for d in entries(folders[s])}) for s in ("train", "val", "test")] == [1, 1, 1]


def test_interrupted_run_keeps_the_previous_data(tmp_path, monkeypatch):
    folders = generate_emt_dataset(tmp_path, seed=1, **TINY)
    before = {split: [d.energy for d in entries(folder)] for split, folder in folders.items()}
    names = sorted(p.name for p in tmp_path.iterdir())
    written = []

    def failing_write(data_objects, path, metadata=True):
        if written:
            raise KeyboardInterrupt  # stands for a run killed while writing the second split
        written.append(path)
        return real_write(data_objects, path, metadata)

    real_write = emt.write_lmdb
    monkeypatch.setattr(emt, "write_lmdb", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate_emt_dataset(tmp_path, seed=2, **TINY)
    assert written, "the first split was written before the interruption"
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no staging folder, no partial split
    assert {split: [d.energy for d in entries(folder)] for split, folder in folders.items()} == before


def test_rerun_replaces_splits_and_drops_stale_ones(tmp_path):
    generate_emt_dataset(tmp_path, n_systems=6, relax_frames=1, md_frames=1, holdout_adsorbate="O")
    assert (tmp_path / "ood").is_dir()
    folders = generate_emt_dataset(tmp_path, seed=5, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "test", "train", "val"]
    assert json.loads((tmp_path / "dataset.json").read_text())["seed"] == 5
    assert sum(len(entries(f)) for f in folders.values()) == 3 * 3


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="holdout_adsorbate must be one of"):
        generate_emt_dataset(tmp_path, n_systems=3, holdout_adsorbate="XeF")
    with pytest.raises(ValueError, match="occurs in none"):
        generate_emt_dataset(tmp_path, n_systems=4, holdout_adsorbate="CO")
    with pytest.raises(ValueError, match="cannot fill"):
        generate_emt_dataset(tmp_path, n_systems=2)
    with pytest.raises(ValueError, match="positive fractions"):
        generate_emt_dataset(tmp_path, n_systems=3, splits={"train": 1.0, "val": 0.0})
    assert not any(tmp_path.iterdir()), "nothing is written for bad arguments"
