"""fairchem's released eqV2-DeNS MPtrj layout in our model: load, same outputs, fine-tune, relax a cell."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from ase.build import bulk as ase_bulk

from fairchem_dens.datasets.emt_bulk import generate_bulk_dataset
from fairchem_dens.models.checkpoints import read_checkpoint
from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.testing import build_model
from fairchem_dens.testing.tolerances import REORDERED_ULPS, assert_ulps

from helpers import DATA, QUICKSTART

OURS_YML = QUICKSTART / "eqv2_dens_bulk_tiny.yml"
PORT_YML = DATA / "fairchem_port_dens_bulk.yml"


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    return generate_bulk_dataset(tmp_path_factory.mktemp("bulk"), families_per_metal=2, md_frames=2, seed=1)


def data_args(bulk):
    return [f"--dataset.{s}.src={bulk['aselmdb'][s]}" for s in ("train", "val", "test")]


def train(config, run_dir, bulk, *extra, timestamp="t"):
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--config-yml",
            str(config),
            "--cpu",
            "--run-dir",
            str(run_dir),
            "--timestamp-id",
            timestamp,
            *data_args(bulk),
            "--optim.eval_every=100000",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=run_dir,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return run_dir / "checkpoints" / timestamp / "checkpoint.pt", result.stdout + result.stderr


@pytest.fixture(scope="module")
def port_checkpoint(bulk, tmp_path_factory):
    """A checkpoint written by fairchem's own DeNS trainer and classes (the released layout)."""
    path, _ = train(PORT_YML, tmp_path_factory.mktemp("port"), bulk)
    return path


def test_the_released_layout_loads_strictly_and_gives_the_same_outputs(port_checkpoint, bulk):
    import fairchem.core.models.equiformer_v2.equiformer_v2_dens  # noqa: F401  (registers the port's names)
    from fairchem.core.common.utils import load_config
    from torch_geometric.data import Batch

    from fairchem_dens.datasets.ase_db import DeNSAseDBDataset
    from fairchem_dens.datasets.lmdb_io import close_lmdb

    checkpoint = read_checkpoint(port_checkpoint)
    ours = build_model(load_config(str(OURS_YML))[0]["model"])
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    ours.load_state_dict(state, strict=True)
    port = build_model(checkpoint["config"]["model"])
    port.load_state_dict(state, strict=True)
    dataset = DeNSAseDBDataset(
        {"src": str(bulk["aselmdb"]["val"]), "a2g_args": {"r_energy": True, "r_forces": True, "r_stress": True}}
    )
    batch = Batch.from_data_list([dataset[i] for i in range(4)])
    close_lmdb(dataset)
    for model in (ours, port):
        model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        a = ours(batch)
        torch.manual_seed(0)
        b = port(batch)
    for key in ("energy", "forces", "stress_isotropic", "stress_anisotropic"):
        assert_ulps(a[key], b[key], REORDERED_ULPS, what=key)


def test_fine_tune_the_released_layout_with_dens_then_relax_a_cell(port_checkpoint, bulk, tmp_path):
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    # --checkpoint resumes the run's state (epoch 1 of the port's run): train one epoch more, with DeNS
    path, log = train(
        OURS_YML,
        tmp_path,
        bulk,
        "--optim.max_epochs=2",
        f"--checkpoint={port_checkpoint}",
        "--optim.denoising_pos_params.prob=1.0",
        "--print-every=1",
        timestamp="ft",
    )
    assert f"Loading checkpoint from: {port_checkpoint}" in log
    assert "denoising_pos_mae" in log and "stress_mae" in log  # DeNS ran; clean structures trained stress
    calculator = OCPCalculator(checkpoint_path=str(path), cpu=True, seed=0)
    atoms = ase_bulk("Cu", "fcc", a=3.7, cubic=True)  # 2.5 % compressed
    atoms.calc = calculator
    stress = atoms.get_stress()
    assert stress.shape == (6,) and np.isfinite(stress).all()
    noise_calls = []
    head = calculator.trainer._unwrapped_model.output_heads["forces"]
    head.denoising_pos_block.register_forward_hook(lambda *args: noise_calls.append(1))
    optimizer = BFGS(FrechetCellFilter(atoms), logfile=None)
    optimizer.run(fmax=0.05, steps=20)
    # the cell moved under the model's stress (a direct model relaxes roughly; no convergence claimed)
    assert optimizer.nsteps >= 1 and abs(atoms.cell.volume - 3.7**3) > 1e-3
    assert not noise_calls  # inference never runs the noise head
