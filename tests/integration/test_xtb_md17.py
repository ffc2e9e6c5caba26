"""`fairchem-dens make-xtb-md17` end to end: a real GFN2-xTB trajectory, MD17 units and
layout, `md17-to-lmdb` on it, and the small-data recipe training on it through fairchem.

Every step runs as a subprocess of the installed command lines, as a user would run
them; tblite is only ever imported in those subprocesses (it must be loaded before
torch, see fairchem_dens.cli._make_xtb_md17).
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.build import molecule

from fairchem_dens.datasets.md17 import KCAL_PER_MOL_IN_EV
from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.resources import configs_dir
from fairchem_dens.testing import read_lmdb
from fairchem_dens.testing.tolerances import (
    F32_STORAGE_ULPS,
    F64_REL,
    XTB_SCF_ENERGY_EV,
    XTB_SCF_FORCES_EV_PER_A,
    assert_ulps,
)

# find_spec, not importorskip: importing tblite after torch clashes over libgomp.
pytestmark = pytest.mark.skipif(
    find_spec("tblite") is None, reason="make-xtb-md17 needs tblite (./dens.sh installs it)"
)

FRAMES, STRIDE = 14, 2
CLI = Path(sys.executable).parent / "fairchem-dens"


def _run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory) -> Path:
    """A 14-frame GFN2-xTB ethanol trajectory written by the real command."""
    folder = tmp_path_factory.mktemp("xtb")
    result = _run(
        [
            CLI,
            "make-xtb-md17",
            "ethanol",
            folder / "ethanol.npz",
            "--frames",
            FRAMES,
            "--stride",
            STRIDE,
            "--equilibration",
            20,
            "--seed",
            3,
        ],
        folder,
    )
    (folder / "stderr.txt").write_text(result.stderr)
    return folder / "ethanol.npz"


def test_generation_reports_its_progress_and_the_file_records_the_spacing(trajectory):
    # a line every 5 % of the MD steps (20 equilibration + 14 frames x 2 steps), the last one at 100 %
    lines = (trajectory.parent / "stderr.txt").read_text().splitlines()
    progress = [line for line in lines if line.startswith("make-xtb-md17 ethanol:")]
    assert len(progress) >= 10 and progress[-1].startswith("make-xtb-md17 ethanol: 100.0 % of 48 MD steps")
    assert any("left" in line for line in progress)
    with np.load(trajectory) as npz:
        assert float(npz["frame_spacing_fs"]) == 0.5 * STRIDE
        assert float(npz["time_span_ps"]) == pytest.approx(FRAMES * 0.5 * STRIDE / 1000, rel=F64_REL)
        assert "0.5 fs x 2 = 1 fs between frames, 0.014 ps in all" in str(npz["theory"])


def _single_point_ev(numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray]:
    """GFN2-xTB energy (eV) and forces (eV/Å) of one frame, in a fresh interpreter."""
    code = (
        "import json, sys, numpy as np\n"
        "from tblite.ase import TBLite\n"
        "from ase import Atoms\n"
        "z, r = json.loads(sys.stdin.read())\n"
        "atoms = Atoms(numbers=z, positions=r)\n"
        "atoms.calc = TBLite(method='GFN2-xTB', verbosity=0)\n"
        "print(json.dumps([atoms.get_potential_energy(), atoms.get_forces().tolist()]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([numbers.tolist(), positions.tolist()]),
        capture_output=True,
        text=True,
        check=True,
    )
    energy, forces = json.loads(result.stdout.strip().splitlines()[-1])
    return energy, np.asarray(forces)


def test_trajectory_has_md17_layout_and_units(trajectory):
    with np.load(trajectory) as npz:
        arrays = {key: npz[key] for key in npz.files}
    assert {"z", "R", "E", "F"} <= set(arrays)
    ethanol = molecule("CH3CH2OH")
    np.testing.assert_array_equal(arrays["z"], ethanol.get_atomic_numbers())
    assert arrays["R"].shape == (FRAMES, 9, 3)
    assert arrays["E"].shape == (FRAMES, 1)  # sGDML keeps energies as a column
    assert arrays["F"].shape == (FRAMES, 9, 3)
    assert "GFN2-xTB" in str(arrays["theory"])
    # MD17 units: a fresh GFN2-xTB single point of a stored frame, in eV, equals the stored
    # kcal/mol values times the converter's factor (to SCF convergence: the MD restarts each
    # SCF from the previous frame's wavefunction; a unit slip would be a factor of 23).
    for frame in (0, FRAMES - 1):
        energy_ev, forces_ev = _single_point_ev(arrays["z"], arrays["R"][frame])
        assert arrays["E"][frame, 0] * KCAL_PER_MOL_IN_EV == pytest.approx(energy_ev, abs=XTB_SCF_ENERGY_EV)
        np.testing.assert_allclose(arrays["F"][frame] * KCAL_PER_MOL_IN_EV, forces_ev, atol=XTB_SCF_FORCES_EV_PER_A)
    # A thermal trajectory: frames differ, bonds stay intact (C-C bond near 1.5 Å).
    assert np.abs(np.diff(arrays["R"], axis=0)).max() > 1e-3
    carbon_carbon = np.linalg.norm(arrays["R"][:, 0] - arrays["R"][:, 1], axis=-1)
    assert np.all((carbon_carbon > 1.3) & (carbon_carbon < 1.8))


def test_md17_to_lmdb_reads_it(trajectory, tmp_path):
    out = tmp_path / "lmdb"
    _run([CLI, "md17-to-lmdb", trajectory, out, "--train", 8, "--val", 3], tmp_path)
    info = json.loads((out / "md17_info.json").read_text())
    assert info["split_sizes"] == {"train": 8, "val": 3, "test": FRAMES - 11}
    assert info["source_metadata"]["theory"].startswith("GFN2-xTB")
    with np.load(trajectory) as npz:
        energies, forces, positions = npz["E"][:, 0], npz["F"], npz["R"]
    entries = read_lmdb(out / "train") + read_lmdb(out / "val") + read_lmdb(out / "test")
    assert sorted(int(e.sid) for e in entries) == list(range(FRAMES))
    for entry in entries:
        frame = int(entry.sid)
        assert float(entry.energy) == pytest.approx(energies[frame] * units.kcal / units.mol, rel=F64_REL)
        assert_ulps(entry.forces, forces[frame] * units.kcal / units.mol, F32_STORAGE_ULPS, what="forces")
        assert_ulps(entry.pos, positions[frame], F32_STORAGE_ULPS, what="positions")


def test_small_data_recipe_trains_on_it(trajectory, tmp_path):
    data = tmp_path / "lmdb"
    _run([CLI, "md17-to-lmdb", trajectory, data, "--train", 8, "--val", 3], tmp_path)
    run_dir = tmp_path / "run"
    # prob 1: the one step of the epoch is a DeNS step, so the denoising path is exercised.
    _run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--cpu",
            "--seed",
            0,
            "--run-dir",
            run_dir,
            "--timestamp-id",
            "t",
            "--config-yml",
            configs_dir() / "md17/xtb_small_data.yml",
            f"--dataset.train.src={data / 'train'}",
            f"--dataset.val.src={data / 'val'}",
            f"--dataset.test.src={data / 'test'}",
            "--optim.max_epochs=1",
            "--optim.batch_size=8",
            "--optim.scheduler_params.warmup_epochs=1",
            "--optim.denoising_pos_params.prob=1.0",
        ],
        tmp_path,
    )
    assert (run_dir / "checkpoints" / "t" / "best_checkpoint.pt").exists()
    with np.load(run_dir / "results" / "t" / "s2ef_predictions.npz") as npz:
        assert len(npz["ids"]) == FRAMES - 11
        assert np.isfinite(npz["forces"]).all() and npz["forces"].shape == ((FRAMES - 11) * 9, 3)
