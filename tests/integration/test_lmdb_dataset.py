"""The LMDB dataset with MD flags: entries, OC20 data_log files, shards, bad files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fairchem_dens.datasets.lmdb_dataset import DeNSLmdbDataset, LmdbDataError, MDFlagError, is_md_line
from fairchem_dens.datasets.lmdb_io import write_lmdb
from fairchem_dens.testing import close_lmdb, fairchem_trainer, lmdb_without, read_lmdb

from helpers import CONFIGS, TINY_EQV2_OVERRIDES, data_overrides

read_all = read_lmdb


def oc20_like_folder(tmp_path, entries, parts=2):
    """LMDBs without `md` plus OC20-style data_log files saying which frames are MD."""
    folder = tmp_path / "s2ef"
    folder.mkdir()
    chunks = [entries[i::parts] for i in range(parts)]
    truth = []
    for number, chunk in enumerate(chunks):
        lines = []
        for data in chunk:
            md = int(data.md)
            del data.md
            kind = "md/aimd_run" if md else "relaxations/adslab"
            lines.append(f"/checkpoint/oc20/{kind}/random{int(data.sid)}.traj,{int(data.fid)},{md}")
            truth.append(md)
        write_lmdb(chunk, folder / f"data.{number:04d}.lmdb", metadata=False)
        (folder / f"data_log.{number:04d}.txt").write_text("\n".join(lines) + "\n")
    natoms = [int(d.natoms) for chunk in chunks for d in chunk]  # sorted-LMDB order, as fairchem reads them
    np.savez(folder / "metadata.npz", natoms=np.array(natoms))
    return folder, truth


def test_md_line_rule():
    assert is_md_line("/data/md/x/random1.traj,1,2")
    assert not is_md_line("/data/relaxations/md_like/random1.traj,1,2")  # relaxations wins
    assert not is_md_line("/data/rattled/random1.traj,1,2")
    assert not is_md_line("/data/relax/random1.traj,1,md")  # only the path field counts


def test_flags_from_entries(emt_data):
    dataset = DeNSLmdbDataset({"src": str(emt_data["train"])})
    try:
        assert dataset.md_source == "entries"
        assert {int(dataset[i].md) for i in range(len(dataset))} == {0, 1}
    finally:
        close_lmdb(dataset)


def test_flags_from_data_logs_folder_and_single_file(emt_data, tmp_path):
    folder, truth = oc20_like_folder(tmp_path, read_all(emt_data["train"]))
    dataset = DeNSLmdbDataset({"src": str(folder)})
    try:
        assert dataset.md_source == "logs"
        assert [int(dataset[i].md) for i in range(len(dataset))] == truth
    finally:
        close_lmdb(dataset)
    single = DeNSLmdbDataset({"src": str(folder / "data.0001.lmdb")})
    try:
        second_half = truth[len(truth) - len(single) :]
        assert [int(single[i].md) for i in range(len(single))] == second_half
    finally:
        close_lmdb(single)


def test_flags_follow_shards(emt_data, tmp_path):
    folder, truth = oc20_like_folder(tmp_path, read_all(emt_data["train"]))
    dataset = DeNSLmdbDataset({"src": str(folder), "shard": 1, "total_shards": 2})
    try:
        offset = len(truth) - len(dataset)
        assert [int(dataset[i].md) for i in range(len(dataset))] == truth[offset:]
    finally:
        close_lmdb(dataset)


def test_log_with_wrong_line_count_fails(emt_data, tmp_path):
    folder, _ = oc20_like_folder(tmp_path, read_all(emt_data["train"]))
    log = folder / "data_log.0001.txt"
    log.write_text("\n".join(log.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(MDFlagError, match=r"data_log.0001.txt has \d+ lines but .*data.0001.lmdb has \d+ entries"):
        DeNSLmdbDataset({"src": str(folder)})


def test_no_md_information_is_reported(emt_data, tmp_path):
    folder = lmdb_without(emt_data["val"], "md", tmp_path / "plain")
    dataset = DeNSLmdbDataset({"src": str(folder)})
    try:
        assert dataset.md_source is None and getattr(dataset[0], "md", None) is None
    finally:
        close_lmdb(dataset)


def test_truncated_lmdb_names_the_file(emt_data, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    source = emt_data["val"] / "data.lmdb"
    data = source.read_bytes()
    (folder / "data.lmdb").write_bytes(data[: len(data) // 3])
    with pytest.raises(LmdbDataError, match="broken"):
        dataset = DeNSLmdbDataset({"src": str(folder)})
        try:
            [dataset[i] for i in range(len(dataset))]
        finally:
            close_lmdb(dataset)
    assert source.read_bytes() == data  # the original is untouched


def test_all_md_recipe_never_corrupts_md_frames(emt_data, tmp_path):
    (config,) = (CONFIGS / "oc20" / "all-md" / "equiformer_v2").glob("*.yml")
    folder, _ = oc20_like_folder(tmp_path, read_all(emt_data["train"]))
    overrides = [
        *data_overrides(emt_data),
        f"--dataset.train.src={folder}",
        "--logger=tensorboard",
        "--optim.denoising_pos_params.prob=1.0",
        *TINY_EQV2_OVERRIDES,
    ]
    with fairchem_trainer(config, tmp_path / "run", *overrides) as ctx:
        trainer = ctx.trainer
        assert trainer.dens.relaxation_only
        trainer.model.train()
        corrupted = 0
        for step, batch in zip(range(1, 5), trainer.train_loader):
            clean = batch.pos.clone()
            trainer.step = step
            out = trainer._forward(batch)
            loss = trainer._compute_loss(out, batch)
            loss.backward()
            moved = (batch.pos - clean).norm(dim=-1) > 0
            md_atoms = batch.md.bool()[batch.batch]
            assert not moved[md_atoms].any()
            corrupted += int(moved.sum())
        assert corrupted > 0


def test_relaxation_only_without_md_information_fails_before_training(emt_data, tmp_path):
    folder = lmdb_without(emt_data["train"], "md", tmp_path / "no_md")
    (config,) = (CONFIGS / "oc20" / "all-md" / "equiformer_v2").glob("*.yml")
    with (
        pytest.raises(ValueError, match="relaxation_only is set but the training dataset"),
        fairchem_trainer(
            config, tmp_path / "run", *data_overrides(emt_data), f"--dataset.train.src={folder}", *TINY_EQV2_OVERRIDES
        ),
    ):
        pass
    shutil.rmtree(folder)
