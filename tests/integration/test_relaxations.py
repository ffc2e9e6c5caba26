"""Relaxations with a DeNS-trained checkpoint: fairchem's run-relaxations and its ASE calculator."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.optimize import BFGS

from fairchem_dens.datasets.emt_data import atoms_to_data, build_system
from fairchem_dens.datasets.lmdb_io import write_lmdb
from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.testing.tolerances import F32_STORAGE_ULPS, assert_ulps

from helpers import QUICKSTART, data_overrides

SYSTEMS = [("Cu", "111", "O", "fcc"), ("Pt", "100", "N", "hollow"), ("Ni", "111", "H", "hcp")]


@pytest.fixture(scope="module")
def dens_checkpoint(emt_data, tmp_path_factory):
    """A tiny EquiformerV2 trained with DeNS for one epoch through `fairchem --mode train`."""
    run = tmp_path_factory.mktemp("dens_run")
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--config-yml",
            str(QUICKSTART / "eqv2_dens_tiny.yml"),
            "--cpu",
            "--run-dir",
            str(run),
            "--timestamp-id",
            "t",
            *data_overrides(emt_data),
            "--optim.max_epochs=2",
            "--optim.eval_every=1000",
            "--optim.denoising_pos_params.prob=0.5",
        ],
        capture_output=True,
        text=True,
        cwd=run,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return run / "checkpoints" / "t" / "checkpoint.pt"


def is2re_lmdb(folder):
    """Initial structures with EMT-relaxed targets (pos_relaxed, energy_relaxed), as OC20 IS2RE/IS2RS data."""
    entries = []
    rng = np.random.default_rng(3)
    for sid, system in enumerate(SYSTEMS):
        atoms = build_system(*system)
        free = atoms.get_tags() > 0
        atoms.positions[free] += rng.normal(0.0, 0.1, size=(int(free.sum()), 3))
        atoms.calc = EMT()
        data = atoms_to_data(atoms, sid=sid, fid=0, md=0)
        relaxed = atoms.copy()
        relaxed.calc = EMT()
        BFGS(relaxed, logfile=None).run(fmax=0.05, steps=100)
        data.pos_relaxed = torch.tensor(relaxed.positions, dtype=torch.float32)
        data.energy_relaxed = float(relaxed.get_potential_energy())
        data.y_relaxed = data.energy_relaxed
        entries.append(data)
    folder.mkdir(parents=True)
    write_lmdb(entries, folder / "data.lmdb")
    return entries


def test_run_relaxations_writes_positions_and_trajectories(emt_data, dens_checkpoint, tmp_path):
    entries = is2re_lmdb(tmp_path / "is2re")
    trajs = tmp_path / "trajs"
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "run-relaxations",
            "--config-yml",
            str(QUICKSTART / "eqv2_dens_tiny.yml"),
            "--cpu",
            "--run-dir",
            str(tmp_path),
            "--timestamp-id",
            "relax",
            "--checkpoint",
            str(dens_checkpoint),
            *data_overrides(emt_data),
            f"--dataset.relax.src={tmp_path / 'is2re'}",
            "--dataset.relax.format=lmdb",
            "--task.write_pos=True",
            "--task.relaxation_steps=15",
            "--task.relaxation_fmax=0.0001",
            "--task.relax_opt.maxstep=0.04",
            "--task.relax_opt.memory=50",
            "--task.relax_opt.damping=1.0",
            "--task.relax_opt.alpha=70.0",
            f"--task.relax_opt.traj_dir={trajs}",
            "--optim.eval_batch_size=3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with np.load(tmp_path / "results" / "relax" / "relaxed_positions.npz") as npz:
        assert npz["ids"].tolist() == ["0", "1", "2"]
        positions = np.split(npz["pos"], npz["chunk_idx"])
    for data, relaxed in zip(entries, positions):
        initial = data.pos.numpy()
        fixed = data.fixed.numpy() == 1
        assert relaxed.shape == initial.shape
        assert_ulps(relaxed[fixed], initial[fixed], F32_STORAGE_ULPS, what="fixed atoms stay put")
        assert np.abs(relaxed[~fixed] - initial[~fixed]).max() > 1e-4  # the others moved
    assert sorted(p.name for p in trajs.glob("*.traj")) == ["0.traj", "1.traj", "2.traj"]
    # with relaxed targets present fairchem also reports IS2RS/IS2RE metrics
    assert "positions_average_distance_within_threshold" in result.stdout + result.stderr


def test_ase_calculator_relaxes_with_a_dens_checkpoint(dens_checkpoint):
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    calculator = OCPCalculator(checkpoint_path=str(dens_checkpoint), cpu=True, seed=0)
    noise_calls = []
    heads = calculator.trainer._unwrapped_model.output_heads
    heads["forces"].denoising_pos_block.register_forward_hook(lambda *a: noise_calls.append(1))
    atoms = build_system("Cu", "111", "O", "fcc")
    atoms.positions[atoms.get_tags() > 0] += np.random.default_rng(0).normal(
        0, 0.05, (int((atoms.get_tags() > 0).sum()), 3)
    )
    start = atoms.positions.copy()
    atoms.calc = calculator
    optimizer = BFGS(atoms, logfile=None, maxstep=0.05)
    energies = []
    optimizer.attach(lambda: energies.append(atoms.get_potential_energy()))
    optimizer.run(fmax=0.05, steps=10)
    assert len(energies) >= 2 and np.isfinite(energies).all()
    fixed = atoms.get_tags() == 0
    np.testing.assert_array_equal(atoms.positions[fixed], start[fixed])  # FixAtoms honoured: never moved
    assert np.abs(atoms.positions[~fixed] - start[~fixed]).max() > 1e-4
    assert not noise_calls  # inference never runs the noise head
