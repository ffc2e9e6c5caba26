"""fairchem 2's compute_loss with the DeNS task losses, in memory, and the unit's refusals before step 1."""

from __future__ import annotations

import hydra
import pytest
import torch
from fairchem.core.modules.loss import DDPMTLoss, MAELoss
from fairchem.core.modules.normalization.normalizer import Normalizer
from fairchem.core.units.mlip_unit.mlip_unit import OutputSpec, Task, compute_loss
from omegaconf import OmegaConf

from fairchem_dens.core.batch import corrupt_batch, corrupted_atoms, corrupted_structures
from fairchem_dens.core.errors import DeNSConfigError, DeNSSetupError
from fairchem_dens.core.roles import EXCLUDED, ORIGINAL, REPLACED
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.fairchem2.loss import DeNSStep, DeNSTaskLoss
from fairchem_dens.fairchem2.unit import DeNSTrainEvalUnit
from fairchem_dens.testing.tolerances import LOSS_REL

from fc2_helpers import DIRECT_CONFIG, batch, build

DENS = {
    "use_denoising_pos": True,
    "denoising_pos_coefficient": 5,
    "denoising_pos_params": {"prob": 0.5, "fixed_noise_std": True, "std": 0.05, "selection": "structure"},
}


def config_tasks() -> list[Task]:
    """The shipped config's energy and forces tasks plus a stress task (role excluded)."""
    tasks = [hydra.utils.instantiate(t) for t in OmegaConf.load(DIRECT_CONFIG)["tasks"]]
    stress = Task(
        name="stress",
        level="system",
        property="stress",
        out_spec=OutputSpec([1, 9], "float32"),
        normalizer=Normalizer(mean=0.0, rmsd=1.0),
        datasets=["emt"],
        loss_fn=DDPMTLoss(MAELoss(), reduction="mean", coefficient=2.0),
    )
    return [*tasks, stress]


def mixed_dens_batch(config: DeNSConfig):
    """A batch with corrupted and clean structures (the first step that gives both)."""
    for step in range(50):
        data = batch()
        if corrupt_batch(config, data, seed=0, step=step):
            structures = corrupted_structures(data)
            if not bool(structures.all()):
                return data
    raise AssertionError("no step with corrupted and clean structures")


def predictions(data, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, b = data.pos.shape[0], data.natoms.numel()
    return {
        "energy": {"energy": torch.randn(b, generator=g, requires_grad=True)},
        "forces": {"forces": torch.randn(n, 3, generator=g, requires_grad=True)},
        "stress": {"stress": torch.randn(b, 9, generator=g, requires_grad=True)},
    }


def test_dens_batch_losses_follow_the_roles_and_other_batches_are_fairchems():
    config = DeNSConfig.from_optim(DENS)
    tasks = config_tasks()
    plain = {task.name: compute_loss([task], predictions(batch()), batch())[task.name] for task in tasks}
    roles = {"energy": ORIGINAL, "forces": REPLACED, "stress": EXCLUDED}
    step = DeNSStep(config, denoising_coefficient=5.0)
    fairchem_losses = {task.name: task.loss_fn for task in tasks}
    for task in tasks:
        task.loss_fn = DeNSTaskLoss(task, roles[task.name], step)
    # no DeNS batch in this step: fairchem's losses, bit for bit
    for task in tasks:
        assert torch.equal(compute_loss([task], predictions(batch()), batch())[task.name], plain[task.name])

    data = mixed_dens_batch(config)
    pred = predictions(data)
    step.batch = data
    losses = compute_loss(tasks, pred, data)
    corrupted, structures = corrupted_atoms(data), corrupted_structures(data)
    free = data.fixed == 0
    # forces (replaced, loss_form hybrid): one mean over the free atoms, noise / std on corrupted ones
    target = torch.where(corrupted.view(-1, 1), data.noise_vec / 0.05, data.forces)
    weights = torch.where(corrupted, 5.0, 10.0)
    per_atom = weights * (pred["forces"]["forces"] - target).norm(dim=-1)
    expected = per_atom[free].sum() / free.sum()
    assert abs(float((losses["forces"] - expected).detach())) <= LOSS_REL * float(expected.detach())
    # stress (excluded): the clean structures only, in fairchem's sum and in its count
    clean = ~structures
    expected = 2.0 * (pred["stress"]["stress"][clean] - data.stress.view(-1, 9)[clean]).abs().mean()
    assert abs(float((losses["stress"] - expected).detach())) <= LOSS_REL * float(expected.detach())
    # energy (original): fairchem's loss on the original labels
    assert torch.equal(
        losses["energy"],
        fairchem_losses["energy"](
            pred["energy"]["energy"].view(-1, 1),
            data.energy.view(-1, 1),
            mult_mask=torch.isfinite(data.energy),
            natoms=data.natoms,
        ),
    )
    assert set(step.metrics) == {"denoising_energy_mae", "denoising_pos_mae", "denoising_force_mae"}
    assert step.metrics["denoising_energy_mae"]["numel"] == data.natoms.numel()
    assert step.metrics["denoising_pos_mae"]["numel"] == 3 * int((corrupted & free).sum())
    assert step.metrics["denoising_force_mae"]["numel"] == 3 * int((~corrupted & free).sum())


@pytest.mark.parametrize("loss_form", ["hybrid", "separate_means"])
def test_a_per_structure_force_reduction_is_fairchems_on_the_dens_targets(loss_form):
    """In a DeNS batch the per_structure loss is fairchem's own per_structure reduction of the per-atom
    terms (noise on corrupted atoms, forces on the others, each with its weight); separate_means takes it
    over the corrupted and over the clean atoms apart."""
    config = DeNSConfig.from_optim(
        {**DENS, "denoising_pos_params": {**DENS["denoising_pos_params"], "loss_form": loss_form}}
    )
    task = config_tasks()[1]
    task.loss_fn.reduction = "per_structure"
    fairchem_loss = task.loss_fn
    step = DeNSStep(config, denoising_coefficient=5.0)
    task.loss_fn = DeNSTaskLoss(task, REPLACED, step)
    data = mixed_dens_batch(config)
    step.batch = data
    prediction = predictions(data)["forces"]["forces"]
    loss = task.loss_fn(prediction, data.forces, mult_mask=torch.isfinite(data.forces).all(dim=-1), natoms=data.natoms)
    corrupted, free = corrupted_atoms(data), data.fixed == 0
    target = torch.where(corrupted.view(-1, 1), data.noise_vec / 0.05, data.forces)
    # fairchem's L2 norm loss times lambda_D / lambda_F; the coefficient is applied per atom above
    weights = torch.where(corrupted, 5.0, 10.0).view(-1, 1) / fairchem_loss.coefficient
    groups = [corrupted & free, ~corrupted & free] if loss_form == "separate_means" else [free]
    expected = sum(
        fairchem_loss(weights * prediction, weights * target, mult_mask=group, natoms=data.natoms) for group in groups
    )
    assert abs(float((loss - expected).detach())) <= LOSS_REL * float(expected.detach())
    # negative control: the plain mean over atoms is another number here
    mean_over_atoms = (weights.view(-1) * fairchem_loss.coefficient * (prediction - target).norm(dim=-1))[
        free
    ].sum() / free.sum()
    assert abs(float((loss - mean_over_atoms).detach())) > 100 * LOSS_REL * float(expected.detach())


def _unit_arguments(**overrides):
    arguments = {
        "job_config": None,
        "model": build(True),
        "optimizer_fn": None,
        "cosine_lr_scheduler_fn": None,
        "tasks": config_tasks(),
        "dens": DENS,
    }
    arguments.update(overrides)
    return arguments


def test_unit_refuses_bad_settings_with_the_cores_message():
    bad = {**DENS, "denoising_pos_params": {**DENS["denoising_pos_params"], "prob": 0}}
    with pytest.raises(DeNSConfigError) as core:
        DeNSConfig.from_optim(bad)
    with pytest.raises(DeNSConfigError) as unit:
        DeNSTrainEvalUnit(**_unit_arguments(dens=bad))
    # the same check, naming the key where a fairchem-2 config holds it
    assert str(unit.value) == str(core.value).replace("optim.", "runner.train_eval_unit.dens.")
    assert str(unit.value).startswith("runner.train_eval_unit.dens.denoising_pos_params.prob is 0")


def test_unit_refuses_a_plain_model_an_unknown_forces_reduction_and_a_config_without_forces():
    with pytest.raises(DeNSSetupError, match="DeNSeSCNMDBackbone"):
        DeNSTrainEvalUnit(**_unit_arguments(model=build(False)))
    tasks = config_tasks()
    tasks[1].loss_fn.reduction = "per_atom"
    with pytest.raises(DeNSSetupError, match="reduces the forces-and-noise loss by mean, sum or per_structure"):
        DeNSTrainEvalUnit(**_unit_arguments(tasks=tasks))
    with pytest.raises(DeNSConfigError, match="no `forces` output"):
        DeNSTrainEvalUnit(**_unit_arguments(tasks=[config_tasks()[0]]))


def test_stress_gradient_reaches_clean_structures_only():
    """Excluded exactly: the stress loss sends no gradient to corrupted structures' predictions."""
    config = DeNSConfig.from_optim(DENS)
    (stress_task,) = [t for t in config_tasks() if t.name == "stress"]
    step = DeNSStep(config)
    stress_task.loss_fn = DeNSTaskLoss(stress_task, EXCLUDED, step)
    data = mixed_dens_batch(config)
    pred = predictions(data)
    step.batch = data
    compute_loss([stress_task], pred, data)["stress"].backward()
    grad = pred["stress"]["stress"].grad.abs().sum(dim=1)
    structures = corrupted_structures(data)
    assert torch.equal(grad[structures], torch.zeros_like(grad[structures]))
    assert bool((grad[~structures] > 0).all())
