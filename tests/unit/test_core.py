"""The DeNS core alone: it imports no framework, and its loss and metrics are right as tensor functions.

The loss and metric tests build no trainer: each loss form against a hand computation,
and the original trainer's reference losses and metrics (tests/data/original_dens)
reproduced from the reference batches' tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fairchem_dens.core import loss as dens_loss
from fairchem_dens.core import metrics as dens_metrics
from fairchem_dens.core.roles import EXCLUDED, ORIGINAL, REPLACED
from fairchem_dens.testing import batch_from_tensors
from fairchem_dens.testing.tolerances import LOSS_ULPS, TRAINER_REFERENCE_ULPS, assert_ulps

from helpers import DATA

ORIGINAL_DENS = DATA / "original_dens"


def l2mae(prediction, target):
    return torch.linalg.vector_norm(prediction - target, dim=-1)


def mae(prediction, target):
    return (prediction - target).abs()


def test_core_imports_without_fairchem_or_torch_geometric():
    code = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('fairchem', 'torch_geometric', 'torch_scatter', 'torch_sparse'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Blocked())
import pkgutil, importlib, fairchem_dens.core
for module in pkgutil.iter_modules(fairchem_dens.core.__path__):
    importlib.import_module('fairchem_dens.core.' + module.name)
print(sorted(m for m in sys.modules if m.startswith('fairchem_dens')))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = eval(result.stdout.strip().splitlines()[-1])
    assert {"fairchem_dens.core.loss", "fairchem_dens.core.metrics", "fairchem_dens.core.batch"} <= set(loaded)
    # nothing outside the core (and the leaf error module) came along
    assert {m for m in loaded if not m.startswith("fairchem_dens.core")} == {"fairchem_dens", "fairchem_dens.errors"}


# A batch of 2 structures, 5 atoms: atom 0 fixed; atoms 1, 2 of structure 0 corrupted.
FIXED = torch.tensor([1, 0, 0, 0, 0])
CORRUPTED = torch.tensor([False, True, True, False, False])
BATCH = torch.tensor([0, 0, 0, 1, 1])
PRED = torch.arange(15, dtype=torch.float32).view(5, 3) / 7
FORCES = torch.ones(5, 3)
NOISE = -torch.ones(5, 3) / 2


def forces_loss(form: str, corrupted=CORRUPTED):
    return dens_loss.output_loss(
        l2mae,
        PRED,
        FORCES,
        role=REPLACED,
        coefficient=100.0,
        rows=dens_loss.counted_rows(FIXED, corrupted, level="atom", num_structures=2),
        corrupted=corrupted,
        corrupted_rows=corrupted,
        noise_target=NOISE,
        denoising_coefficient=10.0,
        loss_form=form,
    )


def test_hybrid_loss_is_one_weighted_mean_over_counted_atoms():
    per_atom = [float(torch.linalg.vector_norm(PRED[i] - (NOISE if CORRUPTED[i] else FORCES)[i])) for i in range(5)]
    weights = [10.0 if CORRUPTED[i] else 100.0 for i in range(5)]
    by_hand = sum(w * v for w, v, fixed in zip(weights, per_atom, FIXED) if not fixed) / 4  # atom 0 is fixed
    assert_ulps(forces_loss("hybrid"), by_hand, LOSS_ULPS)


def test_separate_means_average_clean_and_corrupted_atoms_apart_and_drop_an_empty_mean():
    norms = l2mae(PRED, torch.where(CORRUPTED.view(-1, 1), NOISE, FORCES))
    by_hand = 10.0 * norms[[1, 2]].mean() + 100.0 * norms[[3, 4]].mean()
    assert_ulps(forces_loss("separate_means"), by_hand, LOSS_ULPS)
    clean = torch.zeros(5, dtype=torch.bool)  # an S2EF batch: the corrupted mean is empty and dropped
    assert_ulps(forces_loss("separate_means", clean), 100.0 * l2mae(PRED, FORCES)[1:].mean(), LOSS_ULPS)
    assert forces_loss("separate_means") != forces_loss("hybrid")  # the forms differ here


def test_excluded_output_leaves_out_corrupted_structures_exactly():
    stress_pred = torch.randn(2, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    stress = torch.zeros(2, 9)
    structures = torch.tensor([True, False])
    term = dens_loss.output_loss(
        mae,
        stress_pred,
        stress,
        role=EXCLUDED,
        coefficient=3.0,
        rows=dens_loss.counted_rows(FIXED, CORRUPTED, level="system", num_structures=2),
        corrupted=CORRUPTED,
        corrupted_rows=dens_loss.structure_rows(structures, BATCH, "system"),
    )
    term.backward()
    assert torch.equal(stress_pred.grad[0], torch.zeros(9))  # no gradient at all, not a small one
    assert_ulps(term, 3.0 * stress_pred[1].abs().mean(), LOSS_ULPS)


def test_a_mean_over_nothing_is_a_zero_that_keeps_the_graph():
    pred = torch.ones(0, 3, requires_grad=True)
    term = dens_loss.global_mean(pred.sum(-1))
    assert term.item() == 0.0 and term.requires_grad


def test_global_mean_divides_by_the_count_summed_over_ranks():
    two_ranks = dens_loss.Reduction(world_size=2, sum_over_ranks=lambda count: count + 6)  # the other rank: 6 rows
    assert dens_loss.global_mean(torch.ones(2), ranks=two_ranks).item() == 2 * 2 / 8


def test_metrics_accumulate_and_aggregate_over_a_fixed_key_list():
    metrics = dens_metrics.accumulate({}, dens_metrics.POS_MAE, torch.tensor([1.0, 2.0]))
    dens_metrics.accumulate(metrics, dens_metrics.POS_MAE, torch.tensor([6.0]))
    dens_metrics.accumulate(metrics, dens_metrics.FORCE_MAE, torch.tensor([]))  # empty: nothing added
    assert metrics == {dens_metrics.POS_MAE: {"total": 9.0, "numel": 3, "metric": 3.0}}
    keys = dens_metrics.metric_keys({"energy": ORIGINAL, "forces": REPLACED, "stress": EXCLUDED})
    assert keys == ["denoising_energy_mae", dens_metrics.POS_MAE, dens_metrics.FORCE_MAE]
    assert dens_metrics.aggregate(metrics, keys) == {dens_metrics.POS_MAE: {"total": 9.0, "numel": 3, "metric": 3.0}}


STD = {"eqv2_dens": 0.1, "escn_dens": 0.15}  # optim.denoising_pos_params.std of each reference run


@pytest.mark.parametrize("name", ["eqv2_dens", "escn_dens"])
@pytest.mark.parametrize("case", ["s2ef", "dens_full", "dens_partial"])
def test_original_trainer_losses_and_metrics_from_tensors_alone(name, case):
    expected = json.loads((ORIGINAL_DENS / name / "trainer_reference.json").read_text())
    ref = np.load(ORIGINAL_DENS / name / "reference_outputs.npz")
    batch = batch_from_tensors(DATA / "inputs.pt")
    norm = expected["normalizers"]
    energy_norm, force_rmsd = norm["energy"], norm["forces"]["std"]
    energy = torch.tensor(ref[f"{case}_energy"]).view(-1, 1)  # the model's normalised outputs
    forces = torch.tensor(ref[f"{case}_forces"])
    corrupted = torch.zeros(64, dtype=torch.bool)
    if case == "dens_full":
        corrupted[:] = True  # no noise mask: every atom's output is the noise
    elif case == "dens_partial":
        corrupted = torch.tensor(ref["dens_partial_noise_mask"]).bool()
    noise = torch.tensor(ref[f"{case}_noise_vec"]) if case != "s2ef" else torch.zeros(64, 3)
    structures = torch.zeros(4, dtype=torch.bool).index_fill_(0, batch.batch[corrupted], True)
    common = dict(corrupted=corrupted, corrupted_rows=structures)
    energy_term = dens_loss.output_loss(
        mae,
        energy,
        (batch.energy.view(-1, 1) - energy_norm["mean"]) / energy_norm["std"],
        role=ORIGINAL,
        coefficient=expected["loss_coefficients"]["energy"],
        rows=dens_loss.counted_rows(batch.fixed, corrupted, level="system", num_structures=4),
        **common,
    )
    counted = dens_loss.counted_rows(batch.fixed, corrupted, level="atom", num_structures=4)
    forces_term = dens_loss.output_loss(
        l2mae,
        forces,
        batch.forces / force_rmsd,
        role=REPLACED,
        coefficient=expected["loss_coefficients"]["forces"],
        rows=counted,
        noise_target=noise / STD[name],
        denoising_coefficient=expected["denoising_pos_coefficient"],
        **common,
    )
    assert_ulps(energy_term + forces_term, expected["loss"][case], TRAINER_REFERENCE_ULPS, what=f"{case} loss")
    if case == "dens_full":  # negative control: lambda_D off by 1e-4 relative must fail the same check
        off = dens_loss.output_loss(
            l2mae,
            forces,
            batch.forces / force_rmsd,
            role=REPLACED,
            rows=counted,
            noise_target=noise / STD[name],
            coefficient=expected["loss_coefficients"]["forces"],
            denoising_coefficient=expected["denoising_pos_coefficient"] * (1 + 1e-4),
            **common,
        )
        with pytest.raises(AssertionError, match="ulps"):
            assert_ulps(energy_term + off, expected["loss"][case], TRAINER_REFERENCE_ULPS)
    if case == "s2ef":
        return  # fairchem's own metrics there
    metrics = dens_metrics.accumulate(
        {}, "denoising_energy_mae", (energy.view(-1) * energy_norm["std"] + energy_norm["mean"] - batch.energy).abs()
    )
    for key, errors in dens_metrics.denoising_errors(
        forces, noise, STD[name], corrupted, counted, forces_prediction=forces * force_rmsd, forces=batch.forces
    ).items():
        dens_metrics.accumulate(metrics, key, errors)
    assert set(metrics) == set(expected["metrics"][case])
    for key, value in expected["metrics"][case].items():
        assert_ulps(metrics[key]["metric"], value, TRAINER_REFERENCE_ULPS, what=f"{case} {key}")
