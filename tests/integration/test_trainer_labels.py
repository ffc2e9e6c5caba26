"""Labels and filters the DeNS trainer checks where they enter, and what a training epoch logs."""

from __future__ import annotations

import logging
import re

import pytest

from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.datasets.lmdb_io import write_lmdb
from fairchem_dens.testing import fairchem_trainer, read_lmdb, write_variant
from fairchem_dens.trainers.dens import DeNSSetupError
from fairchem_dens.trainers.guards import check_skip_filters
from fairchem_dens.trainers.labels import NonFiniteLabelError

from helpers import QUICKSTART, data_overrides

DENS_YML = QUICKSTART / "eqv2_dens_tiny.yml"
P = "--optim.denoising_pos_params."
BAD_ENTRY = 3


def with_nan_force(source, folder):
    """A copy of an LMDB training set whose entry BAD_ENTRY has one NaN force; returns (folder, its sid)."""
    entries = read_lmdb(source)
    entries[BAD_ENTRY].forces[0, 0] = float("nan")
    folder.mkdir(parents=True)
    write_lmdb(entries, folder / "data.lmdb")
    return folder, entries[BAD_ENTRY].sid


def build(tmp_path, emt_data, *overrides, config=DENS_YML):
    with fairchem_trainer(config, tmp_path / "run", *data_overrides(emt_data), *overrides) as ctx:
        return ctx.trainer


# ------------------------------------------------------------------ skip filters
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "min_num_atoms=500",
            r"min_num_atoms=500 \(the largest has \d+ atoms\) excludes every training structure "
            r"of .* \(\d+ structures\): DeNS would never corrupt one",
        ),
        (
            "max_force_norm=1e-06",
            r"max_force_norm=1e-06 eV/Å \(the smallest per-structure max \|F_i\| is [0-9.e-]+ eV/Å\) "
            r"excludes every training structure",
        ),
    ],
)
def test_skip_filters_that_exclude_every_training_structure_are_refused(emt_data, tmp_path, setting, message):
    with pytest.raises(DeNSSetupError, match=message):
        build(tmp_path, emt_data, f"{P}{setting}")


def test_skip_filters_that_only_together_exclude_every_structure_are_named_together():
    dens = DeNSConfig.from_optim(
        {
            "use_denoising_pos": True,
            "denoising_pos_coefficient": 10,
            "denoising_pos_params": {
                "prob": 1.0,
                "fixed_noise_std": True,
                "std": 0.1,
                "min_num_atoms": 10,
                "max_force_norm": 1.0,
            },
        }
    )
    # the small structure passes the force filter, the large one the size filter, none both
    values = {"min_num_atoms": [5, 12], "max_force_norm": [0.5, 2.0]}
    with pytest.raises(
        DeNSSetupError,
        match=r"min_num_atoms=10 \(the largest has 12 atoms\) and .*max_force_norm=1.0 "
        r"eV/Å \(the smallest per-structure max \|F_i\| is 0.5 eV/Å\) together "
        r"exclude every training structure of train \(2 structures\)",
    ):
        check_skip_filters(dens, values, "train")
    check_skip_filters(dens, {"min_num_atoms": [5, 12], "max_force_norm": [0.5, 0.9]}, "train")  # the large one passes


def test_skip_filters_that_keep_some_structures_are_accepted(emt_data, tmp_path):
    # the largest EMT structure passes min_num_atoms = its own size: the rule is "at least"
    sizes = [int(entry.natoms) for entry in read_lmdb(emt_data["train"])]
    trainer = build(tmp_path, emt_data, f"{P}min_num_atoms={max(sizes)}")
    assert trainer.dens.min_num_atoms == max(sizes)


# ------------------------------------------------------------------ non-finite labels
def test_a_nan_force_is_named_at_the_normalizer_fit(emt_data, tmp_path):
    train, sid = with_nan_force(emt_data["train"], tmp_path / "nan_train")
    with pytest.raises(
        DeNSSetupError,
        match=rf"the training set {train} has NaN/inf labels, found by the normalizer "
        rf"fit: {train / 'data.lmdb'} entry {BAD_ENTRY} \(sid {sid}\): `forces`",
    ):
        build(tmp_path, emt_data, f"--dataset.train.src={train}")


def test_a_nan_force_read_by_fit_workers_is_blamed_on_the_labels(emt_data, tmp_path):
    # the fit's worker processes read the entries: the NaN shows in the fitted rmsd alone
    train, _ = with_nan_force(emt_data["train"], tmp_path / "nan_train")
    with pytest.raises(
        DeNSSetupError,
        match=r"the normalizer of `forces` has rmsd nan \(fitted on \d+ training sample\(s\)\): "
        r"the `forces` labels it was fitted on hold NaN/inf values",
    ):
        build(
            tmp_path,
            emt_data,
            f"--dataset.train.src={train}",
            "--dataset.train.transforms.normalizer.fit.num_workers=1",
        )


def given_normalizers(config):
    # values set by hand: no fit reads the labels before training
    config["dataset"]["train"]["transforms"]["normalizer"] = {
        "energy": {"mean": 0.0, "rmsd": 1.0},
        "forces": {"mean": 0.0, "rmsd": 1.0},
    }


def test_a_nan_force_without_a_fit_stops_its_batch_before_corruption(emt_data, tmp_path):
    train, sid = with_nan_force(emt_data["train"], tmp_path / "nan_train")
    config = write_variant(DENS_YML, tmp_path / "c.yml", given_normalizers)
    with fairchem_trainer(
        config,
        tmp_path / "run",
        *data_overrides(emt_data),
        f"--dataset.train.src={train}",
        f"{P}prob=1.0",
        "--optim.max_epochs=1",
        "--optim.eval_every=1000",
    ) as ctx:
        trainer = ctx.trainer
        encoded = []
        corrupt = trainer.corrupt
        trainer.corrupt = lambda batch, **kwargs: encoded.append(batch.sid.tolist()) or corrupt(batch, **kwargs)
        ctx.task.setup(trainer)
        with pytest.raises(
            NonFiniteLabelError,
            match=rf"the `forces` label has 1 NaN/inf value\(s\) in the training "
            rf"batch at step (\d+) \(epoch [0-9.]+\), structure\(s\) with sid {sid}:",
        ) as raised:
            ctx.task.run()
        step = int(re.search(r"at step (\d+)", str(raised.value)).group(1))
        assert trainer.step == step and len(encoded) == step - 1  # the bad batch was never corrupted


# ------------------------------------------------------------------ refusals write nothing
def test_a_refused_run_leaves_the_existing_normalizers_file_alone(emt_data, tmp_path):
    build(tmp_path, emt_data)
    saved = tmp_path / "run" / "checkpoints" / "test" / "normalizers.pt"
    before = saved.read_bytes(), saved.stat().st_mtime_ns
    train, _ = with_nan_force(emt_data["train"], tmp_path / "nan_train")
    refused = {
        "a NaN label": f"--dataset.train.src={train}",
        "a warm-up of 0 steps": "--optim.scheduler_params.warmup_epochs=0.01",
    }
    for why, override in refused.items():
        with pytest.raises(DeNSSetupError):
            build(tmp_path, emt_data, override)
        assert (saved.read_bytes(), saved.stat().st_mtime_ns) == before, f"a run refused for {why} rewrote {saved}"


# ------------------------------------------------------------------ per-epoch corruption
EPOCH_LINE = re.compile(r"DeNS epoch 1: corrupted (\d+)/(\d+) structures \([0-9.]+%\), (\d+)/(\d+) atoms \([0-9.]+%\)")


def one_epoch_log(emt_data, tmp_path, caplog, *overrides):
    with fairchem_trainer(
        DENS_YML,
        tmp_path / "run",
        *data_overrides(emt_data),
        "--optim.max_epochs=1",
        "--optim.batch_size=8",
        "--optim.eval_every=1000",
        *overrides,
    ) as ctx:
        ctx.task.setup(ctx.trainer)
        with caplog.at_level(logging.INFO):
            ctx.task.run()
        return [r for r in caplog.records if EPOCH_LINE.search(r.getMessage())]


def test_each_epoch_logs_what_it_corrupted(emt_data, tmp_path, caplog):
    records = one_epoch_log(emt_data, tmp_path, caplog, f"{P}selection=structure", f"{P}prob=0.5")
    assert len(records) == 1 and records[0].levelno == logging.INFO
    structures, total, atoms, total_atoms = map(int, EPOCH_LINE.search(records[0].getMessage()).groups())
    entries = read_lmdb(emt_data["train"])
    assert (total, total_atoms) == (len(entries), sum(int(entry.natoms) for entry in entries))
    assert 0 < structures < total and 0 < atoms < total_atoms  # half the structures, half of their free atoms


def test_an_epoch_that_corrupted_nothing_warns(emt_data, tmp_path, caplog):
    # corrupt_ratio 0.5 draws about half of the free atoms; a cap of 1% of them drops every structure
    records = one_epoch_log(emt_data, tmp_path, caplog, f"{P}strict_max_ratio=0.01", f"{P}prob=1.0")
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert re.search(
        r"corrupted 0/\d+ structures \(0.0%\), 0/\d+ atoms \(0.0%\): DeNS is on but corrupted nothing",
        records[0].getMessage(),
    )
