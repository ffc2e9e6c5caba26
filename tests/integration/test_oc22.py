"""The OC22 recipe at tiny size: total energies, fitted element references, float32 predictions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.testing import read_lmdb

from helpers import CONFIGS, TINY_EQV2_OVERRIDES, data_overrides

frames = read_lmdb


def test_oc22_recipe_with_fitted_references(emt_data, tmp_path):
    references = tmp_path / "refs.npz"
    fit = subprocess.run(
        [sys.executable, "-m", "fairchem_dens.cli", "fit-element-references", str(emt_data["train"]), str(references)],
        capture_output=True,
        text=True,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]
    coefficients = np.load(references)["element_references"]
    train = frames(emt_data["train"])
    energies = np.array([d.energy for d in train])
    predicted = np.array([coefficients[d.atomic_numbers.long().numpy()].sum() for d in train])
    assert np.abs(energies - predicted).mean() < np.abs(energies - energies.mean()).mean()

    (config,) = (CONFIGS / "oc22" / "equiformer_v2").glob("*.yml")
    common = [
        "--config-yml",
        str(config),
        "--cpu",
        "--run-dir",
        str(tmp_path),
        *data_overrides(emt_data),
        f"--dataset.train.transforms.element_references.energy.file={references}",
        "--dataset.train.key_mapping={}",
        "--dataset.val.key_mapping={}",
        "--dataset.test.key_mapping={}",
        *TINY_EQV2_OVERRIDES,
    ]
    train_run = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--timestamp-id",
            "t",
            "--optim.max_epochs=1",
            "--optim.eval_every=1000",
            "--optim.checkpoint_every=-1",
            "--print-every",
            "1",
            "--optim.denoising_pos_params.prob=1.0",
            *common,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert train_run.returncode == 0, train_run.stdout[-3000:] + train_run.stderr[-3000:]
    assert "denoising_pos_mae" in train_run.stdout + train_run.stderr
    predict = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "predict",
            "--timestamp-id",
            "p",
            "--checkpoint",
            str(tmp_path / "checkpoints" / "t" / "checkpoint.pt"),
            *common,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    with np.load(tmp_path / "results" / "p" / "s2ef_predictions.npz") as npz:
        assert npz["energy"].dtype == np.float32 and npz["forces"].dtype == np.float32
        test = {f"{int(d.sid)}_{int(d.fid)}": d.energy for d in frames(emt_data["test"])}
        truth = np.array([test[i] for i in npz["ids"]])
        # total energies: the element references are added back to the predictions
        assert np.abs(npz["energy"] - truth).mean() < np.abs(truth - truth.mean()).mean() + 1.0
        assert np.abs(npz["energy"]).mean() > 0.5 * np.abs(truth).mean()
