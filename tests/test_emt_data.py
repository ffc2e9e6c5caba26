"""The built-in EMT example: real fairchem LMDBs with OC20 conventions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fairchem.core.common.data_parallel import data_list_collater

from fairchem_dens.datasets.emt_data import generate_emt_dataset
from fairchem_dens.testing import read_lmdb


entries = read_lmdb


def test_splits_follow_oc20_conventions(emt_data):
    assert set(emt_data) == {"train", "val", "test", "ood"}
    seen_md = set()
    sids = {}
    for split, folder in emt_data.items():
        data = entries(folder)
        assert data, split
        natoms = np.load(folder / "metadata.npz")["natoms"]
        assert natoms.tolist() == [int(d.natoms) for d in data]  # load balancing metadata
        for d in data:
            n = int(d.natoms)
            assert d.pos.shape == (n, 3) and d.forces.shape == (n, 3) and d.forces.dtype == torch.float32
            assert isinstance(d.energy, float)
            assert torch.equal(d.tags == 0, d.fixed == 1)  # tag 0 = fixed slab atom
            assert set(d.tags.tolist()) == {0, 1, 2}
            assert d.forces[d.fixed == 1].abs().sum() > 0  # OC20 keeps forces on fixed atoms
            assert d.cell.shape == (1, 3, 3)
            seen_md.add(int(d.md))
            sids.setdefault(split, set()).add(int(d.sid))
    assert seen_md == {0, 1}
    assert all(not (sids[a] & sids[b]) for a in sids for b in sids if a < b)  # split by system
    info = json.loads((emt_data["train"].parent / "dataset.json").read_text())
    assert info["units"]["forces"].startswith("eV/Å")
    assert all(s["adsorbate"] == "OH" for sid, s in info["systems"].items() if int(sid) in sids["ood"])
    assert all(info["systems"][str(sid)]["adsorbate"] != "OH" for split in ("train", "val", "test") for sid in sids[split])


def test_collates_into_a_batch(emt_data):
    data = entries(emt_data["train"])[:3]
    batch = data_list_collater(data, otf_graph=True)
    assert batch.natoms.numel() == 3
    assert batch.pos.shape[0] == sum(int(d.natoms) for d in data)
    assert batch.cell.shape == (3, 3, 3) and batch.md.shape == (3,)


def test_deterministic_per_seed(tmp_path):
    a = generate_emt_dataset(tmp_path / "a", n_systems=3, relax_frames=1, md_frames=1, seed=3)
    b = generate_emt_dataset(tmp_path / "b", n_systems=3, relax_frames=1, md_frames=1, seed=3)
    c = generate_emt_dataset(tmp_path / "c", n_systems=3, relax_frames=1, md_frames=1, seed=4)
    first, second, other = entries(a["train"]), entries(b["train"]), entries(c["train"])
    assert all(torch.equal(x.pos, y.pos) and x.energy == y.energy for x, y in zip(first, second))
    assert any(x.pos.shape != y.pos.shape or not torch.equal(x.pos, y.pos) for x, y in zip(first, other))
    # nothing half-written is left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dataset.json", "test", "train", "val"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="holdout_adsorbate"):
        generate_emt_dataset(tmp_path, n_systems=3, holdout_adsorbate="XeF")
    with pytest.raises(ValueError, match="cannot fill"):
        generate_emt_dataset(tmp_path, n_systems=2)
