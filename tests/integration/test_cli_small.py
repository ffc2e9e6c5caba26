"""`fairchem-dens` commands as users run them: help texts and refusals to overwrite."""

from __future__ import annotations

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "fairchem_dens.cli"]


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600, **kwargs)


def test_make_xtb_md17_help_shows_its_options():
    result = run("make-xtb-md17", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fairchem-dens make-xtb-md17 [-h] [--frames FRAMES]")
    for option in ("--temperature", "--stride", "--equilibration", "--seed", "--overwrite", "ethanol"):
        assert option in result.stdout
    wrong = run("make-xtb-md17", "--frames", "3", "ethanl", "out.npz")  # options first, a typo: answered here
    assert wrong.returncode == 2 and "invalid choice: 'ethanl'" in wrong.stderr


def test_make_emt_data_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "emt"
    out.mkdir()  # an empty folder is fine
    first = run("make-emt-data", out, "--systems", "4", "--holdout", "O")
    assert first.returncode == 0, first.stderr
    before = (out / "dataset.json").read_text()
    again = run("make-emt-data", out, "--systems", "5", "--holdout", "O")
    assert again.returncode != 0
    assert again.stderr.strip() == f"make-emt-data: {out} exists and is not empty; pass --overwrite to replace its data"
    assert (out / "dataset.json").read_text() == before  # nothing already written is lost
    replaced = run("make-emt-data", out, "--systems", "5", "--holdout", "O", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "dataset.json").read_text())["n_systems"] == 5
