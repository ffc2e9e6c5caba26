"""`fairchem --mode predict/validate` straight from checkpoints of the original DeNS code."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.testing.tolerances import EQV2_OTHER_SEED_ATOL_EV, ESCN_OTHER_SEED_ATOL_EV

from helpers import ORIGINAL, config_for, fixture_lmdb


@pytest.mark.parametrize(
    ("name", "atol"), [("eqv2_dens", EQV2_OTHER_SEED_ATOL_EV), ("escn_dens", ESCN_OTHER_SEED_ATOL_EV)]
)
def test_predict_from_an_original_checkpoint(tmp_path, name, atol):
    folder, tensors = fixture_lmdb(tmp_path / "data")
    config = config_for(name, folder, tmp_path / "config.yml")
    ref = np.load(ORIGINAL / name / "reference_outputs.npz")
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "predict",
            "--config-yml",
            str(config),
            "--cpu",
            "--run-dir",
            str(tmp_path),
            "--timestamp-id",
            "pred",
            "--checkpoint",
            str(ORIGINAL / name / "checkpoint.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "is an original DeNS checkpoint: converting it" in result.stdout + result.stderr
    with np.load(tmp_path / "results" / "pred" / "s2ef_predictions.npz") as npz:
        assert npz["ids"].tolist() == ["0_0", "1_0", "2_0", "3_0"]
        # the original predict(): EMA weights, denormalised; the random draws of edge frames
        # and sphere samples differ (no forward seed here): fairchem_dens/testing/tolerances.py
        np.testing.assert_allclose(npz["energy"], ref["predict_energy"], atol=atol)
        free = tensors["fixed"].numpy() == 0
        np.testing.assert_allclose(npz["forces"], ref["predict_forces"][free], atol=atol)


def test_validate_from_an_original_checkpoint(tmp_path):
    folder, _ = fixture_lmdb(tmp_path / "data")
    config = config_for("eqv2_dens", folder, tmp_path / "config.yml")
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "validate",
            "--config-yml",
            str(config),
            "--cpu",
            "--run-dir",
            str(tmp_path),
            "--timestamp-id",
            "val",
            "--checkpoint",
            str(ORIGINAL / "eqv2_dens" / "checkpoint.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "forces_mae:" in result.stdout + result.stderr
