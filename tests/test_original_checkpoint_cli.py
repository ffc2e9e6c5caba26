"""`fairchem --mode predict/validate` straight from checkpoints of the original DeNS code."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import yaml
from torch_geometric.data import Data

from fairchem_dens.datasets.lmdb_io import write_lmdb
from fairchem_dens.models.checkpoints import checkpoint_family, original_model_config, read_checkpoint
from fairchem_dens.quickstart import fairchem_command

from conftest import DATA
from tolerances import EQV2_OTHER_SEED_ATOL_EV, ESCN_OTHER_SEED_ATOL_EV

ORIGINAL = DATA / "original_dens"


def fixture_lmdb(folder):
    """The 4 fixture structures as a fairchem LMDB (what the reference outputs were computed on)."""
    tensors = torch.load(DATA / "inputs.pt", weights_only=True)
    starts = [0, *torch.cumsum(tensors["natoms"], 0).tolist()]
    entries = []
    for s, n in enumerate(tensors["natoms"].tolist()):
        atoms = slice(starts[s], starts[s] + n)
        entries.append(Data(
            pos=tensors["pos"][atoms], cell=tensors["cell"][s:s + 1], atomic_numbers=tensors["atomic_numbers"][atoms],
            natoms=n, fixed=tensors["fixed"][atoms], tags=tensors["tags"][atoms], forces=tensors["forces"][atoms],
            energy=float(tensors["energy"][s]), sid=int(tensors["sid"][s]), fid=int(tensors["fid"][s]),
        ))
    # py-lmdb refuses to open one file twice in a process: val and test get a copy each.
    for split in ("val", "test"):
        (folder / split).mkdir(parents=True)
        write_lmdb(entries, folder / split / "data.lmdb")
    return folder, tensors


def config_for(name, data_folder, path):
    checkpoint = read_checkpoint(ORIGINAL / name / "checkpoint.pt")
    _, family = checkpoint_family(checkpoint)
    kwargs = json.loads((ORIGINAL / name / "model_kwargs.json").read_text())["kwargs"]
    config = {
        "trainer": "fairchem_dens.trainers.dens.DeNSTrainer",
        "model": original_model_config(family, kwargs),
        "dataset": {"val": {"format": "lmdb", "src": str(data_folder / "val")},
                    "test": {"format": "lmdb", "src": str(data_folder / "test")}},
        "outputs": {"energy": {"level": "system"},
                    "forces": {"level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True}},
        "loss_functions": [{"energy": {"fn": "mae", "coefficient": 2}}, {"forces": {"fn": "l2mae", "coefficient": 100}}],
        "evaluation_metrics": {"primary_metric": "forces_mae", "metrics": {"energy": ["mae"], "forces": ["mae"]}},
        "task": {"prediction_dtype": "float32"},
        "logger": "tensorboard",
        "optim": {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "max_epochs": 1, "lr_initial": 1e-4,
                  "ema_decay": 0.999, "use_denoising_pos": True, "scheduler": "LambdaLR",
                  "scheduler_params": {"lambda_type": "cosine", "warmup_factor": 0.2, "warmup_epochs": 0.1,
                                       "lr_min_factor": 0.01},
                  "denoising_pos_params": {"prob": 0.5, "fixed_noise_std": True, "std": 0.1, "corrupt_ratio": 0.5},
                  "denoising_pos_coefficient": 10},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("name", "atol"), [("eqv2_dens", EQV2_OTHER_SEED_ATOL_EV),
                                            ("escn_dens", ESCN_OTHER_SEED_ATOL_EV)])
def test_predict_from_an_original_checkpoint(tmp_path, name, atol):
    folder, tensors = fixture_lmdb(tmp_path / "data")
    config = config_for(name, folder, tmp_path / "config.yml")
    ref = np.load(ORIGINAL / name / "reference_outputs.npz")
    result = subprocess.run(
        [*fairchem_command(), "--mode", "predict", "--config-yml", str(config), "--cpu", "--run-dir", str(tmp_path),
         "--timestamp-id", "pred", "--checkpoint", str(ORIGINAL / name / "checkpoint.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "is an original DeNS checkpoint: converting it" in result.stdout + result.stderr
    with np.load(tmp_path / "results" / "pred" / "s2ef_predictions.npz") as npz:
        assert npz["ids"].tolist() == ["0_0", "1_0", "2_0", "3_0"]
        # the original predict(): EMA weights, denormalised; the random draws of edge frames
        # and sphere samples differ (no forward seed here): tests/tolerances.py
        np.testing.assert_allclose(npz["energy"], ref["predict_energy"], atol=atol)
        free = tensors["fixed"].numpy() == 0
        np.testing.assert_allclose(npz["forces"], ref["predict_forces"][free], atol=atol)


def test_validate_from_an_original_checkpoint(tmp_path):
    folder, _ = fixture_lmdb(tmp_path / "data")
    config = config_for("eqv2_dens", folder, tmp_path / "config.yml")
    result = subprocess.run(
        [*fairchem_command(), "--mode", "validate", "--config-yml", str(config), "--cpu", "--run-dir", str(tmp_path),
         "--timestamp-id", "val", "--checkpoint", str(ORIGINAL / "eqv2_dens" / "checkpoint.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "forces_mae:" in result.stdout + result.stderr
