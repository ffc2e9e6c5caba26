"""Bulk materials with DeNS: EMT bulk data with stress, ASE databases, stress excluded per structure."""

from __future__ import annotations

import subprocess
import sys

import ase
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.io import write

from fairchem_dens.datasets.ase_db import DeNSAseDBDataset
from fairchem_dens.datasets.emt_bulk import generate_bulk_dataset, write_aselmdb
from fairchem_dens.testing import fairchem_trainer, mixed_dens_batch, read_lmdb
from fairchem_dens.testing.tolerances import F32_STORAGE_ULPS, LOSS_REL, assert_ulps, f32_tol

from helpers import QUICKSTART, data_overrides

BULK_YML = QUICKSTART / "eqv2_dens_bulk_tiny.yml"
P = "--optim.denoising_pos_params."
STRESS_TERMS = ("stress_isotropic", "stress_anisotropic")


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    return generate_bulk_dataset(tmp_path_factory.mktemp("bulk"), families_per_metal=2, md_frames=2, seed=0)


def close(dataset):
    from fairchem_dens.datasets.lmdb_io import close_lmdb

    close_lmdb(dataset)  # py-lmdb refuses to open a file twice in one process


def bulk_overrides(bulk, layout="aselmdb"):
    return [f"--dataset.{split}.src={bulk[layout][split]}" for split in ("train", "val", "test")]


def test_bulk_data_hold_emt_energy_forces_and_stress_in_both_layouts(bulk):
    assert ase.__version__ < "3.25"  # fairchem 1.10's relaxations need it; .aselmdb still reads
    dataset = DeNSAseDBDataset(
        {"src": str(bulk["aselmdb"]["train"]), "a2g_args": {"r_energy": True, "r_forces": True, "r_stress": True}}
    )
    entries = read_lmdb(bulk["lmdb"]["train"] / "data.lmdb")
    assert len(dataset) == len(entries) > 10
    natoms = np.load(bulk["aselmdb"]["train"] / "metadata.npz")["natoms"]
    assert natoms.tolist() == [int(e.natoms) for e in entries] and set(natoms) <= {4, 8, 16}
    for index in (0, len(entries) - 1):
        from_db, from_lmdb = dataset[index], entries[index]
        atoms = dataset.get_atoms(index)
        atoms.calc = EMT()  # recompute: the stored labels are EMT's, ASE's sign and units (eV/Å³)
        stress = torch.tensor(atoms.get_stress(voigt=False), dtype=torch.float32).view(1, 3, 3)
        for data in (from_db, from_lmdb):
            # the same EMT on the same float64 positions: only the labels' float32 storage differs
            assert_ulps(data.stress.view(1, 3, 3), stress, F32_STORAGE_ULPS, what="stress")
            energy = atoms.get_potential_energy()
            assert data.energy == pytest.approx(energy, abs=f32_tol(abs(energy), F32_STORAGE_ULPS))
            assert_ulps(data.forces, atoms.get_forces(), F32_STORAGE_ULPS, what="forces")
    close(dataset)
    strained = [abs(float(e.stress.view(3, 3)[0, 0])) for e in entries]
    assert max(strained) > 1e-3  # ±3 % strains: EMT stresses of order 0.01 eV/Å³


def test_make_emt_data_bulk_command(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "make-emt-data",
            "--bulk",
            str(tmp_path),
            "--families",
            "1",
            "--md-frames",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "aselmdb" / "val" / "data.aselmdb").is_file()
    assert (tmp_path / "lmdb" / "test" / "metadata.npz").is_file()
    assert "aselmdb train:" in result.stdout


@pytest.mark.parametrize("layout", ["aselmdb", "lmdb"])
def test_stress_of_corrupted_structures_is_excluded_and_clean_ones_train(bulk, tmp_path, layout):
    overrides = bulk_overrides(bulk, layout)
    if layout == "lmdb":
        overrides += [f"--dataset.{s}.format=lmdb" for s in ("train", "val", "test")]
    with fairchem_trainer(BULK_YML, tmp_path, *overrides, "--optim.batch_size=6") as ctx:
        trainer = ctx.trainer
        assert {n: trainer.output_roles[n] for n in ("stress", *STRESS_TERMS)} == dict.fromkeys(
            ("stress", *STRESS_TERMS), "excluded"
        )
        assert "energy" in trainer.elementrefs  # fitted element references, as the MPtrj recipe
        batch, corrupted = mixed_dens_batch(trainer)
        trainer.model.eval()
        out = trainer._forward(batch)
        loss = trainer._compute_loss(out, batch)
        assert torch.isfinite(loss)
        for name, coefficient in zip(STRESS_TERMS, (5, 5)):
            target = trainer.normalizers[name].norm(batch[name].view(batch.natoms.numel(), -1))
            errors = (out[name].float() - target).abs()[~corrupted]
            term = trainer._loss_term(name, out[name], batch, dict(trainer.loss_functions)[name])
            assert term.item() == pytest.approx(coefficient * errors.mean().item(), rel=LOSS_REL)
            grad = torch.autograd.grad(term, out[name], retain_graph=True)[0]
            assert bool((grad[corrupted] == 0).all()) and bool((grad[~corrupted] != 0).any())
        metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
        clean = int((~corrupted).sum())
        assert metrics["stress_mae"]["numel"] == 9 * clean and metrics["stress_isotropic_mae"]["numel"] == clean
        stress = out["stress"].detach().view(-1, 9)[~corrupted]
        expected = (stress - batch.stress.view(-1, 9)[~corrupted]).abs().mean()
        assert metrics["stress_mae"]["metric"] == pytest.approx(expected.item(), rel=LOSS_REL)
        assert {"denoising_energy_mae", "denoising_pos_mae"} <= set(metrics)


def test_stress_learns_in_dens_training(tmp_path):
    bulk = generate_bulk_dataset(
        tmp_path / "bulk", families_per_metal=6, md_frames=4
    )  # make-emt-data --bulk: 140 training frames
    with fairchem_trainer(
        BULK_YML, tmp_path, *bulk_overrides(bulk), "--optim.max_epochs=8", "--optim.eval_every=100000", f"{P}prob=0.5"
    ) as ctx:
        trainer = ctx.trainer
        before = trainer.validate("val", disable_tqdm=True)["stress_mae"]["metric"]
        ctx.task.setup(trainer)
        ctx.task.run()
        after = trainer.validate("val", disable_tqdm=True)["stress_mae"]["metric"]
    assert after < 0.85 * before  # measured on the default bulk set: 0.0108 -> 0.0078 eV/Å³ in 8 epochs


def test_ase_read_multi_extxyz_with_stress(bulk, tmp_path):
    dataset = DeNSAseDBDataset({"src": str(bulk["aselmdb"]["train"])})
    frames = [dataset.get_atoms(i) for i in range(len(dataset))]
    close(dataset)
    folder = tmp_path / "xyz"
    folder.mkdir()
    write(folder / "train.extxyz", frames)
    multi = [
        "--dataset.train.format=ase_read_multi",
        f"--dataset.train.src={folder}",
        "--dataset.train.pattern=*.extxyz",
        "--optim.load_balancing_on_error=warn_and_no_balance",
    ]
    with fairchem_trainer(BULK_YML, tmp_path / "run", *bulk_overrides(bulk), *multi, f"{P}prob=1.0") as ctx:
        trainer = ctx.trainer
        assert len(trainer.train_dataset) == len(frames)
        batch, corrupted = mixed_dens_batch(trainer)
        trainer.model.train()
        loss = trainer._compute_loss(trainer._forward(batch), batch)
        loss.backward()
        assert torch.isfinite(loss)


def test_fixed_atoms_from_fixatoms_in_an_ase_database(tmp_path, emt_data):
    from fairchem_dens.datasets.emt_data import build_system

    frames = []
    for site in ("fcc", "hcp", "ontop"):
        atoms = build_system("Cu", "111", "O", site)  # bottom layer under FixAtoms
        atoms.rattle(0.05, seed=len(frames))
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    (tmp_path / "slabs").mkdir()
    write_aselmdb(frames, tmp_path / "slabs" / "data.aselmdb")
    dataset_args = [
        "--dataset.train.format=fairchem_dens.datasets.ase_db.DeNSAseDBDataset",
        f"--dataset.train.src={tmp_path / 'slabs'}",
        "--dataset.train.a2g_args.r_energy=True",
        "--dataset.train.a2g_args.r_forces=True",
        "--dataset.train.a2g_args.r_fixed=True",
    ]
    with fairchem_trainer(
        QUICKSTART / "eqv2_dens_tiny.yml",
        tmp_path / "run",
        *data_overrides(emt_data),
        *dataset_args,
        f"{P}prob=1.0",
        f"{P}corrupt_ratio=None",
    ) as ctx:
        batch = next(iter(ctx.trainer.train_loader))
        assert int(batch.fixed.sum()) == 4 * batch.natoms.numel()  # the 2x2 bottom layer of each slab
        clean = batch.pos.clone()
        assert ctx.trainer.corrupt(batch, step=1)
        moved = (batch.pos - clean).norm(dim=-1) > 0
        assert not moved[batch.fixed == 1].any() and moved[batch.fixed == 0].all()


def test_stress_asked_of_data_without_it_is_refused(tmp_path, emt_data):
    # the OC20-like slab LMDBs carry energy and forces only
    with pytest.raises(ValueError, match=r"loss_functions trains `stress_isotropic` but the training dataset"):
        with fairchem_trainer(
            BULK_YML,
            tmp_path,
            *data_overrides(emt_data),
            *[f"--dataset.{s}.format=lmdb" for s in ("train", "val", "test")],
        ):
            pass


def test_max_stress_norm_without_stress_is_refused(tmp_path, emt_data):
    with pytest.raises(ValueError, match=r"max_stress_norm is set but the training dataset .* has no `stress`"):
        with fairchem_trainer(
            QUICKSTART / "eqv2_dens_tiny.yml", tmp_path, *data_overrides(emt_data), f"{P}max_stress_norm=0.1"
        ):
            pass


def test_max_stress_norm_skips_stressed_structures(bulk, tmp_path):
    with fairchem_trainer(
        BULK_YML, tmp_path, *bulk_overrides(bulk), f"{P}prob=1.0", f"{P}corrupt_ratio=None", f"{P}max_stress_norm=0.02"
    ) as ctx:
        batch = next(iter(ctx.trainer.train_loader))
        ctx.trainer.corrupt(batch, step=1)
        norms = batch.stress.view(-1, 9).norm(dim=-1)
        corrupted = torch.zeros(batch.natoms.numel(), dtype=torch.bool)
        if hasattr(batch, "noise_mask") or getattr(batch, "denoising_pos_forward", False):
            corrupted.index_fill_(
                0, batch.batch[getattr(batch, "noise_mask", torch.ones_like(batch.fixed).bool())], True
            )
        assert torch.equal(corrupted, norms <= 0.02)
        assert (norms > 0.02).any() and (norms <= 0.02).any()
