"""Shared fixtures: the fixture batch of the original implementation, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fairchem_dens.testing import batch_from_tensors

DATA = Path(__file__).parent / "data"


@pytest.fixture()
def fixture_batch():
    """4 OC20-like EMT structures (64 atoms, fixed bottom layers) as a PyG batch."""
    return batch_from_tensors(DATA / "inputs.pt")


@pytest.fixture(autouse=True)
def _one_thread():
    # Reproducible float sums and no oversubscription on 2-core CI machines.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
