"""Shared fixtures: the fixture batch of the original implementation, tiny data sets.

They apply to every folder under tests/; helpers that are not fixtures are in helpers.py.
"""

from __future__ import annotations

import os
from importlib import metadata

import pytest
import torch

from helpers import DATA

# tests/fairchem2 runs in the fairchem-2 environment; a fairchem-1.10 run leaves it out.
if metadata.version("fairchem-core").split(".")[0] != "2":
    collect_ignore = ["fairchem2"]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a CUDA GPU is, and are skipped (saying why) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def fixture_batch():
    """4 OC20-like EMT structures (64 atoms, fixed bottom layers) as a PyG batch."""
    from fairchem_dens.testing import batch_from_tensors

    return batch_from_tensors(DATA / "inputs.pt")


@pytest.fixture(autouse=True)
def _one_thread():
    # No oversubscription on 2-core CI machines; OMP_NUM_THREADS=2 checks that the
    # tolerances (fairchem_dens/testing/tolerances.py) also cover the other summation orders of 2 threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def emt_data(tmp_path_factory):
    """A tiny OC20-like EMT data set as fairchem LMDBs (train/val/test/ood)."""
    from fairchem_dens.datasets.emt_data import generate_emt_dataset

    out = tmp_path_factory.mktemp("emt")
    return generate_emt_dataset(out, n_systems=8, relax_frames=3, md_frames=2, seed=0, holdout_adsorbate="OH")


@pytest.fixture(scope="session")
def bulk_overrides(tmp_path_factory) -> list[str]:
    """CLI overrides pointing a bulk config at a tiny EMT bulk set (.aselmdb, energy/forces/stress)."""
    from fairchem_dens.datasets.emt_bulk import generate_bulk_dataset

    bulk = generate_bulk_dataset(tmp_path_factory.mktemp("bulk"), families_per_metal=2, md_frames=2, seed=2)
    return [f"--dataset.{split}.src={bulk['aselmdb'][split]}" for split in ("train", "val", "test")]
