"""Your own data (docs/data.md#your-own-data): extxyz / ASE databases / LMDBs -> metadata.npz -> DeNS training."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
import torch

from fairchem_dens.datasets.emt_bulk import generate_bulk_dataset
from fairchem_dens.datasets.metadata import MetadataError, write_dataset_metadata

from helpers import CONFIGS, ROOT

DATA_DOC = ROOT / "docs" / "data.md"


def doc_blocks(section: str, language: str) -> list[str]:
    """The ```language blocks of one section of docs/data.md (up to the next "## " heading or the end)."""
    text = DATA_DOC.read_text()
    body = text[text.index(f"\n## {section}\n") :]
    end = body.find("\n## ", 1)
    body = body if end < 0 else body[:end]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def test_own_data_steps_of_the_docs_train_with_dens(tmp_path):
    """The steps of docs/data.md, run as written: extxyz by ASE, write-metadata, fairchem --mode train."""
    (python_block,) = doc_blocks("Your own data", "python")
    (bash_block,) = doc_blocks("Your own data", "bash")
    (tmp_path / "configs").symlink_to(CONFIGS)  # the steps run from a checkout's root
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    made = subprocess.run([sys.executable, "-c", python_block], cwd=tmp_path, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", bash_block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    for split in ("train", "val", "test"):
        frames = ase.io.read(tmp_path / "my_data" / split / "frames.extxyz", ":")
        with np.load(tmp_path / "my_data" / split / "metadata.npz") as npz:
            assert npz["natoms"].tolist() == [len(atoms) for atoms in frames]
        assert f"wrote my_data/{split}/metadata.npz: {len(frames)} entries" in log
    # both epochs corrupted structures of the 16 training frames
    assert len(re.findall(r"DeNS epoch [12]: corrupted [1-9]\d*/16 structures", log)) == 2, log[-4000:]
    checkpoint = torch.load(tmp_path / "runs" / "checkpoints" / "own" / "checkpoint.pt", weights_only=True)
    assert {"denoising_pos_target", "stress_isotropic", "stress_anisotropic"} <= set(checkpoint["normalizers"])
    assert checkpoint["config"]["dataset"]["format"] == "ase_read_multi"  # fairchem saves the training split


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    """The EMT bulk example: .aselmdb and LMDB splits with the generator's own metadata.npz."""
    return generate_bulk_dataset(tmp_path_factory.mktemp("bulk"), families_per_metal=1, md_frames=1, seed=3)


def without_metadata(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    (target / "metadata.npz").unlink()
    return target


def test_write_metadata_equals_the_generators_for_aselmdb_lmdb_and_sqlite(bulk, tmp_path):
    for layout in ("aselmdb", "lmdb"):
        with np.load(bulk[layout]["train"] / "metadata.npz") as npz:
            expected = npz["natoms"]
        copy = without_metadata(bulk[layout]["train"], tmp_path / layout)
        path, natoms, _ = write_dataset_metadata(copy)
        assert path == copy / "metadata.npz"
        np.testing.assert_array_equal(natoms, expected)
        with np.load(path) as npz:
            np.testing.assert_array_equal(npz["natoms"], expected)
        # a file src: its metadata goes to its folder, where fairchem looks for it
        path, natoms, _ = write_dataset_metadata(next(copy.glob(f"*.{layout}")), overwrite=True)
        assert path == copy / "metadata.npz"
        np.testing.assert_array_equal(natoms, expected)
    (tmp_path / "sqlite").mkdir()
    with ase.db.connect(tmp_path / "sqlite" / "frames.db") as database:
        for n in (2, 5, 3):
            database.write(ase.Atoms(f"Cu{n}", positions=np.arange(3 * n).reshape(n, 3)))
    path, natoms, dataset_format = write_dataset_metadata(tmp_path / "sqlite", dataset_format="ase_db")
    assert natoms.tolist() == [2, 5, 3] and dataset_format.endswith("DeNSAseDBDataset")


def test_write_metadata_refusals(bulk, tmp_path):
    copy = without_metadata(bulk["lmdb"]["val"], tmp_path / "val")
    write_dataset_metadata(copy)
    with pytest.raises(MetadataError, match=re.escape(f"{copy / 'metadata.npz'} exists; pass --overwrite")):
        write_dataset_metadata(copy)
    shutil.copy(copy / "data.lmdb", copy / "more.lmdb")
    with pytest.raises(MetadataError, match="which would also be read for more.lmdb there: give each split a folder"):
        write_dataset_metadata(copy / "data.lmdb", overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no data here")
    with pytest.raises(MetadataError, match=r"cannot tell the dataset format of .*notes \(file suffixes: \.txt\)"):
        write_dataset_metadata(tmp_path / "notes")
    with pytest.raises(MetadataError, match="does not exist"):
        write_dataset_metadata(tmp_path / "missing")
