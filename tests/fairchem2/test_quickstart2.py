"""The fairchem-2 quickstart as users run it, and the numbers its recipes take from the data."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from fairchem.core.scripts.create_finetune_dataset import compute_normalizer_and_linear_reference

from fairchem_dens.fairchem2.normalizers import fit_normalizers, overrides


def test_fit_normalizers_gives_what_fairchems_finetuning_script_computes(emt_root):
    ours = fit_normalizers(emt_root / "train")
    force_rms, coefficients = compute_normalizer_and_linear_reference(str(emt_root / "train" / "data.aselmdb"), 1)
    # the same least-squares fit on the same numbers; the rms sums a few hundred float64 squares
    np.testing.assert_allclose(ours["elem_refs"], coefficients, rtol=1e-12, atol=1e-12)
    assert ours["normalizer_rmsd"] == pytest.approx(float(force_rms), rel=1e-12)
    assert overrides(ours)[1] == f"normalizer_rmsd={ours['normalizer_rmsd']:.6g}"


def test_fit_normalizers_gives_exact_zeros_for_elements_the_data_lacks(emt_root):
    import ase.db

    with ase.db.connect(str(emt_root / "train" / "data.aselmdb")) as database:
        present = {int(z) for row in database.select() for z in row.numbers}
    references = fit_normalizers(emt_root / "train")["elem_refs"]
    assert present and all(references[z] != 0.0 for z in present)
    assert all(value == 0.0 for z, value in enumerate(references) if z not in present)
    assert ",0," in overrides({"elem_refs": references, "normalizer_rmsd": 1.0})[0]  # printed as 0, not 5.9e-19


def test_the_lmdb_layout_needs_fairchem_1_and_says_so(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "make-emt-data",
            "--bulk",
            "--families",
            "1",
            "--md-frames",
            "1",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "the lmdb layout needs fairchem-core 1.x" in result.stderr and "--layout aselmdb" in result.stderr
    assert not (tmp_path / "data" / "aselmdb").exists()


def test_quickstart2_command_at_one_epoch(tmp_path):
    """`fairchem-dens quickstart2` as users run it: its data, both variants through `fairchem -c`, the table."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "quickstart2",
            "--workdir",
            str(tmp_path / "qs"),
            "--epochs",
            "1",
            "--seeds",
            "0",
            "--jobs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert re.search(r"DeNS / plain = \d\.\d{3} \(per seed \d\.\d{3}\); energy DeNS / plain = \d\.\d{3}", out)
    assert re.search(r"element refs only +\d+\.\d +\d+\.\d +\d+\.\d", out)
    assert re.search(r"\[dens seed 0 +\d+s\] epoch +1 +validation F MAE", out)
    summary = json.loads((tmp_path / "qs" / "quickstart2_results.json").read_text())
    for variant in ("plain", "dens"):
        run = summary[f"{variant}-seed0"]
        assert 0 < run["model_force_meV_per_A"] < 5000 and run["val_force"][0][0] == 1
    dens_log = (tmp_path / "qs" / "runs" / "dens-seed0" / "train.log").read_text()
    plain_log = (tmp_path / "qs" / "runs" / "plain-seed0" / "train.log").read_text()
    assert "denoising_pos_mae" in dens_log and "denoising_pos_mae" not in plain_log
    described = json.loads((tmp_path / "qs" / "data" / "dataset.json").read_text())
    assert sum(split["frames"] for split in described["splits"].values()) == 1050
    assert (tmp_path / "qs" / "validation_curves.png").stat().st_size > 0
