"""MD17 / rMD17 .npz files to fairchem LMDBs: units, splits, layouts, errors, atomicity.

The input files are made here: rattled methane frames labelled with ASE's EMT,
whose eV energies and eV/Å forces are divided by the kcal/mol factor so that the
files hold MD17's units and the converter's conversion back to eV is visible.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from ase import units
from fairchem.core.common.data_parallel import data_list_collater

from fairchem_dens.datasets import md17
from fairchem_dens.datasets.md17 import KCAL_PER_MOL_IN_EV, MD17FormatError, convert_md17
from fairchem_dens.testing import read_lmdb
from fairchem_dens.testing.tolerances import F32_STORAGE_ULPS, F64_REL, F64_STATISTICS_REL, assert_ulps

from helpers import emt_md17_frames

KCAL = units.kcal / units.mol


@pytest.fixture(scope="module")
def frames():
    """1005 EMT-labelled methane frames in eV / eV/Å (computed once, sliced by the tests)."""
    frames = emt_md17_frames("CH4", 1005, 0.05)
    return {"z": frames["z"], "R": frames["R"], "E_eV": frames["E"], "F_eV": frames["F"]}


def write_npz(path, frames, n=40, layout="sgdml", drop=(), **changes):
    """An MD17 file of the first ``n`` frames in kcal/mol units; ``changes`` replace arrays by key."""
    E, F = frames["E_eV"][:n] / KCAL, frames["F_eV"][:n] / KCAL
    if layout == "sgdml":
        arrays = {
            "z": frames["z"],
            "R": frames["R"][:n],
            "E": E[:, None],
            "F": F,
            "name": np.array("methane"),
            "theory": np.array("EMT"),
        }
    else:
        arrays = {
            "nuclear_charges": frames["z"],
            "coords": frames["R"][:n],
            "energies": E,
            "forces": F,
            "old_indices": np.arange(n) + 7,
            "old_energies": E + 1.0,
            "old_forces": F + 1.0,
        }
    arrays.update(changes)
    for key in drop:
        del arrays[key]
    np.savez(path, **arrays)
    return path


entries = read_lmdb


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_factor_is_ase_kcal_per_mol():
    assert KCAL_PER_MOL_IN_EV == pytest.approx(0.0433641043, rel=1e-8)
    assert KCAL_PER_MOL_IN_EV == KCAL


def test_sgdml_file_converts_to_ev_entries(tmp_path, frames):
    src = write_npz(tmp_path / "methane.npz", frames)
    folders = convert_md17(src, tmp_path / "out", n_train=20, n_val=5)
    assert set(folders) == {"train", "val", "test"}
    sizes = {}
    for split, folder in folders.items():
        data = entries(folder)
        sizes[split] = len(data)
        assert np.load(folder / "metadata.npz")["natoms"].tolist() == [5] * len(data)
        for d in data:
            i = int(d.sid)
            assert isinstance(d.energy, float) and int(d.fid) == 0
            assert d.energy == pytest.approx(frames["E_eV"][i], rel=F64_REL)  # kcal/mol and back in float64
            assert_ulps(d.forces, frames["F_eV"][i], F32_STORAGE_ULPS, what="forces")
            assert_ulps(d.pos, frames["R"][i], F32_STORAGE_ULPS, what="positions")
            assert d.forces.dtype == torch.float32
            assert d.atomic_numbers.tolist() == frames["z"].tolist() and int(d.natoms) == 5
            assert d.tags.tolist() == [1] * 5 and d.fixed.tolist() == [0] * 5
            assert d.pbc.shape == (1, 3) and not d.pbc.any()
            assert d.cell.shape == (1, 3, 3) and torch.equal(d.cell[0], 50.0 * torch.eye(3))
    assert sizes == {"train": 20, "val": 5, "test": 15}
    (tmp_path / "plain").mkdir()  # the output folder gets the permissions of an ordinary mkdir
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").rmdir()
    batch = data_list_collater(entries(folders["train"])[:2], otf_graph=True)
    assert batch.pos.shape == (10, 3) and batch.energy.shape == (2,)
    assert batch.cell.shape == (2, 3, 3) and batch.pbc.shape == (2, 3) and batch.sid.shape == (2,)
    assert leftovers(tmp_path) == []


def test_rmd17_layout_gives_the_same_entries(tmp_path, frames):
    sgdml = convert_md17(write_npz(tmp_path / "a.npz", frames), tmp_path / "a", n_train=20, n_val=5)
    rmd17 = convert_md17(
        write_npz(tmp_path / "rmd17_methane.npz", frames, layout="rmd17"), tmp_path / "b", n_train=20, n_val=5
    )
    for split in ("train", "val", "test"):
        for x, y in zip(entries(sgdml[split]), entries(rmd17[split]), strict=True):
            assert int(x.sid) == int(y.sid)  # frame index in the file, not old_indices
            assert x.energy == y.energy and torch.equal(x.forces, y.forces)  # the same arithmetic
    info = json.loads((tmp_path / "b" / "md17_info.json").read_text())
    assert info["format"] == "rmd17" and info["molecule"] == "rmd17_methane"


def test_split_is_the_seeded_permutation_and_reproducible(tmp_path, frames):
    src = write_npz(tmp_path / "m.npz", frames)
    convert_md17(src, tmp_path / "s1", n_train=20, n_val=5, seed=1)
    convert_md17(src, tmp_path / "s1again", n_train=20, n_val=5, seed=1)
    convert_md17(src, tmp_path / "s2", n_train=20, n_val=5, seed=2)
    one, again, two = (np.load(tmp_path / name / "splits.npz") for name in ("s1", "s1again", "s2"))
    perm = np.random.default_rng(1).permutation(40)
    np.testing.assert_array_equal(one["train"], perm[:20])
    np.testing.assert_array_equal(one["val"], perm[20:25])
    np.testing.assert_array_equal(one["test"], perm[25:])
    assert all(np.array_equal(one[k], again[k]) for k in ("train", "val", "test"))
    assert not np.array_equal(one["train"], two["train"])
    together = np.concatenate([one["train"], one["val"], one["test"]])
    assert sorted(together.tolist()) == list(range(40))  # disjoint and covering
    assert one["train"].dtype.kind == "i"
    for split in ("train", "val", "test"):  # LMDB order is the permutation order
        assert [int(d.sid) for d in entries(tmp_path / "s1" / split)] == one[split].tolist()


def test_default_split_is_950_50_rest(tmp_path, frames):
    src = write_npz(tmp_path / "m.npz", frames, n=1005)
    folders = convert_md17(src, tmp_path / "out")
    splits = np.load(tmp_path / "out" / "splits.npz")
    assert {k: len(splits[k]) for k in ("train", "val", "test")} == {"train": 950, "val": 50, "test": 5}
    np.testing.assert_array_equal(splits["train"], np.random.default_rng(1).permutation(1005)[:950])
    assert len(np.load(folders["train"] / "metadata.npz")["natoms"]) == 950
    info = json.loads((tmp_path / "out" / "md17_info.json").read_text())
    train_e = frames["E_eV"][splits["train"]]
    stats = info["train_statistics"]
    assert stats["energy_mean"] == pytest.approx(train_e.mean(), rel=F64_STATISTICS_REL)
    assert stats["energy_std"] == pytest.approx(train_e.std(), rel=F64_STATISTICS_REL)
    assert stats["forces_rmsd"] == pytest.approx(
        np.sqrt(np.mean(frames["F_eV"][splits["train"]] ** 2)), rel=F64_STATISTICS_REL
    )


def test_info_records_provenance_and_units(tmp_path, frames):
    src = write_npz(tmp_path / "m.npz", frames)
    convert_md17(src, tmp_path / "out", n_train=20, n_val=5, seed=3)
    info = json.loads((tmp_path / "out" / "md17_info.json").read_text())
    assert info["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert info["source_path"] == str(src.resolve())
    assert info["format"] == "sgdml" and info["molecule"] == "methane"  # from the `name` key
    assert info["source_metadata"] == {"theory": "EMT"}
    assert (info["n_frames"], info["n_atoms"], info["atomic_numbers"]) == (40, 5, [6, 1, 1, 1, 1])
    assert info["units"] == {"energy": "eV", "forces": "eV/Å", "positions": "Å"}
    assert info["source_units"]["energy"] == "kcal/mol"
    assert info["kcal_per_mol_to_eV"] == KCAL and info["seed"] == 3
    assert info["split_sizes"] == {"train": 20, "val": 5, "test": 15}
    assert set(info["train_statistics"]) >= {"energy_mean", "energy_std", "forces_rmsd"}
    named = convert_md17(src, tmp_path / "named", n_train=20, n_val=5, molecule="CH4")
    assert json.loads((named["train"].parent / "md17_info.json").read_text())["molecule"] == "CH4"


BAD_INPUTS = {
    "missing key": (dict(drop=("F",)), "'F'"),
    "forces frames differ": (dict(F=np.zeros((39, 5, 3))), "'F'"),
    "atoms differ": (dict(z=np.array([6, 1, 1, 1], dtype=np.uint8)), "'R'"),
    "energy frames differ": (dict(E=np.zeros((38, 1))), "'E'"),
    "NaN energy": (dict(E=np.where(np.arange(40)[:, None] == 3, np.nan, 1.0)), "'E'"),
    "too few frames": (dict(n=25), "'R'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_and_leave_nothing(tmp_path, frames, case):
    changes, key = BAD_INPUTS[case]
    src = write_npz(tmp_path / "bad.npz", frames, **changes)
    with pytest.raises(MD17FormatError) as error:
        convert_md17(src, tmp_path / "out", n_train=20, n_val=5)
    assert str(src) in str(error.value) and key in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # no output, no temp dir


def test_not_an_npz_and_mixed_layouts_raise(tmp_path, frames):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(MD17FormatError, match="junk.npz"):
        convert_md17(junk, tmp_path / "out", n_train=20, n_val=5)
    half = write_npz(tmp_path / "half.npz", frames, layout="rmd17", drop=("forces",))
    with pytest.raises(MD17FormatError, match=r"'forces'"):
        convert_md17(half, tmp_path / "out", n_train=20, n_val=5)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_out_dir_is_refused_unless_overwrite(tmp_path, frames):
    src = write_npz(tmp_path / "m.npz", frames)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_md17(src, out, n_train=20, n_val=5)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    convert_md17(src, out, n_train=20, n_val=5, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["md17_info.json", "splits.npz", "test", "train", "val"]
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing_and_keeps_old_output(tmp_path, frames, monkeypatch):
    src = write_npz(tmp_path / "m.npz", frames)
    real, calls = md17.frame_to_data, []

    def failing(*args):
        calls.append(1)
        if len(calls) > 30:  # in the val split, after train is written
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(md17, "frame_to_data", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_md17(src, tmp_path / "out", n_train=20, n_val=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    calls.clear()
    with pytest.raises(RuntimeError):
        convert_md17(src, old, n_train=20, n_val=5, overwrite=True)
    assert [p.name for p in old.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


def test_large_split_is_sharded_into_sorted_lmdbs(tmp_path, frames, monkeypatch):
    monkeypatch.setattr(md17, "MAX_ENTRIES_PER_LMDB", 7)
    src = write_npz(tmp_path / "m.npz", frames)
    folders = convert_md17(src, tmp_path / "out", n_train=20, n_val=5)
    assert sorted(p.name for p in folders["test"].glob("*.lmdb")) == [f"data.{i:04d}.lmdb" for i in range(3)]
    splits = np.load(tmp_path / "out" / "splits.npz")
    assert [int(d.sid) for d in entries(folders["test"])] == splits["test"].tolist()
    assert np.load(folders["test"] / "metadata.npz")["natoms"].tolist() == [5] * 15
    info = json.loads((tmp_path / "out" / "md17_info.json").read_text())
    assert info["lmdb_files"]["test"] == ["data.0000.lmdb", "data.0001.lmdb", "data.0002.lmdb"]


def test_entries_per_lmdb_stays_within_write_lmdb_map(frames, tmp_path):
    loaded = md17.load_md17(write_npz(tmp_path / "m.npz", frames))
    # One 4 KiB overflow page per ~3 KB entry: 1 GiB holds ~259,000 (measured); keep a margin.
    assert 150_000 < md17._entries_per_lmdb(loaded) < 230_000
