"""The DeNS trainer on real fairchem machinery: losses, metrics, corruption, errors."""

from __future__ import annotations

import pytest
import torch

from fairchem_dens.models.equiformer_v2 import is_dens_batch
from fairchem_dens.testing import fairchem_trainer, mixed_dens_batch
from fairchem_dens.testing.tolerances import (
    ELEMENTWISE_ULPS,
    F32_STORAGE_REL,
    FIT_STATISTICS_REL,
    LOSS_REL,
    assert_ulps,
)
from fairchem_dens.trainers.dens import DeNSTrainer, NonFiniteLossError

from helpers import QUICKSTART, data_overrides

DENS_YML = QUICKSTART / "eqv2_dens_tiny.yml"


@pytest.fixture()
def trainer_ctx(emt_data, tmp_path, request):
    extra = getattr(request, "param", [])
    with fairchem_trainer(
        DENS_YML,
        tmp_path,
        *data_overrides(emt_data),
        "--optim.denoising_pos_params.prob=1.0",
        "--optim.batch_size=3",
        *extra,
    ) as ctx:
        yield ctx


def first_batch(trainer):
    return next(iter(trainer.train_loader))


def corrupted_forward(trainer, step=1):
    batch = first_batch(trainer)
    assert trainer.corrupt(batch, step=step)
    trainer.model.eval()  # the batch is already corrupted; eval keeps _forward from redoing it
    return batch, trainer._forward(batch)


def test_trainer_class_and_task_name(trainer_ctx):
    trainer = trainer_ctx.trainer
    assert isinstance(trainer, DeNSTrainer)
    assert trainer.name == "s2ef"  # predictions go to s2ef_predictions.npz
    assert trainer.config["trainer"] == "forces"  # checkpoints reload in a plain trainer
    assert trainer.normalizers["denoising_pos_target"].rmsd.item() == pytest.approx(0.05, rel=F32_STORAGE_REL)


def test_corruption_moves_only_masked_free_atoms(trainer_ctx):
    trainer = trainer_ctx.trainer
    clean = first_batch(trainer)
    batch = clean.clone()
    assert trainer.corrupt(batch, step=4)
    assert is_dens_batch(batch)
    moved = (batch.pos - clean.pos).norm(dim=-1) > 0
    assert torch.equal(moved, batch.noise_mask)
    assert not moved[clean.fixed == 1].any()
    assert_ulps(batch.pos - clean.pos, batch.noise_vec, ELEMENTWISE_ULPS, scale=clean.pos.abs().max(), what="noise")
    assert torch.equal(batch.forces, clean.forces)  # original forces stay the targets


def test_hybrid_loss_has_original_semantics(trainer_ctx):
    trainer = trainer_ctx.trainer
    batch, out = corrupted_forward(trainer)
    loss = trainer._compute_loss(out, batch)
    free = batch.fixed == 0
    mask = batch.noise_mask
    energy_target = trainer.normalizers["energy"].norm(batch.energy.view(-1, 1))
    energy_term = 2 * (out["energy"].view(-1, 1) - energy_target).abs().mean()
    noise_target = batch.noise_vec / 0.05
    force_target = trainer.normalizers["forces"].norm(batch.forces)
    target = torch.where(mask.view(-1, 1), noise_target, force_target)
    weight = torch.where(mask, torch.tensor(10.0), torch.tensor(100.0))
    hybrid = (weight * (out["forces"] - target).norm(dim=-1))[free].mean()
    assert loss.item() == pytest.approx((energy_term + hybrid).item(), rel=LOSS_REL)


@pytest.mark.parametrize("trainer_ctx", [["--optim.denoising_pos_params.corrupt_ratio=None"]], indirect=True)
def test_full_corruption_loss_uses_lambda_d_only(trainer_ctx):
    trainer = trainer_ctx.trainer
    batch, out = corrupted_forward(trainer)
    assert bool(batch.noise_mask[batch.fixed == 0].all())  # every free atom is noised
    loss = trainer._compute_loss(out, batch)
    free = batch.fixed == 0
    energy_target = trainer.normalizers["energy"].norm(batch.energy.view(-1, 1))
    energy_term = 2 * (out["energy"].view(-1, 1) - energy_target).abs().mean()
    noise_term = 10 * (out["forces"] - batch.noise_vec / 0.05)[free].norm(dim=-1).mean()
    assert loss.item() == pytest.approx((energy_term + noise_term).item(), rel=LOSS_REL)


def test_s2ef_loss_is_fairchems(trainer_ctx):
    # our loss is computed by our own term code (the one rule for every batch kind);
    # on an S2EF batch it must equal fairchem's OCPTrainer._compute_loss
    trainer = trainer_ctx.trainer
    batch = first_batch(trainer)
    trainer.model.eval()
    out = trainer._forward(batch)
    assert not is_dens_batch(batch)
    ours = trainer._compute_loss(out, batch)
    fairchem_loss = super(DeNSTrainer, trainer)._compute_loss(out, batch)
    assert ours.item() == pytest.approx(fairchem_loss.item(), rel=LOSS_REL)


def test_denoising_metrics_in_physical_units(trainer_ctx):
    trainer = trainer_ctx.trainer
    batch, out = corrupted_forward(trainer)
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    assert set(metrics) == {"denoising_energy_mae", "denoising_pos_mae", "denoising_force_mae"}
    free, mask = batch.fixed == 0, batch.noise_mask
    pos_mae = (out["forces"].detach() * 0.05 - batch.noise_vec)[mask & free].abs().mean()
    assert metrics["denoising_pos_mae"]["metric"] == pytest.approx(pos_mae.item(), rel=LOSS_REL)
    forces = trainer.normalizers["forces"].denorm(out["forces"].detach())
    force_mae = (forces - batch.forces)[~mask & free].abs().mean()
    assert metrics["denoising_force_mae"]["metric"] == pytest.approx(force_mae.item(), rel=LOSS_REL)


def test_non_finite_terms_are_named(trainer_ctx):
    trainer = trainer_ctx.trainer
    batch, out = corrupted_forward(trainer)
    # finite predictions whose loss overflows: the term is named
    huge = {**out, "forces": out["forces"] * 3e38}
    with pytest.raises(NonFiniteLossError, match=r"the denoising loss is inf in a partial-corruption batch"):
        trainer._compute_loss(huge, batch)
    clean = first_batch(trainer)
    out = trainer._forward(clean)
    huge = {**out, "energy": out["energy"] + 3e38}
    with pytest.raises(NonFiniteLossError, match=r"the energy loss is inf in a S2EF batch"):
        trainer._compute_loss(huge, clean)


def hand_hybrid(trainer, out, batch, weight_d=10.0, weight_f=100.0, atoms=None, fn="l2mae"):
    """The partial-corruption term of docs/algorithm.md#loss, by hand; ``fn`` applied per atom (mae: per component)."""
    mask = batch.noise_mask
    atoms = batch.fixed == 0 if atoms is None else atoms
    target = torch.where(mask.view(-1, 1), batch.noise_vec / 0.05, trainer.normalizers["forces"].norm(batch.forces))
    weight = torch.where(mask, torch.tensor(weight_d), torch.tensor(weight_f))
    residual = out["forces"].float() - target
    per_atom = residual.norm(dim=-1) if fn == "l2mae" else residual.abs()
    return (weight.view(-1, *[1] * (per_atom.dim() - 1)) * per_atom)[atoms].mean()


def energy_term(trainer, out, batch, structures=None):
    target = trainer.normalizers["energy"].norm(batch.energy.view(-1, 1))
    errors = (out["energy"].view(-1, 1) - target).abs()
    return 2 * (errors if structures is None else errors[structures]).mean()


def test_linear_decay_weighs_the_denoising_term(trainer_ctx):
    trainer = trainer_ctx.trainer
    trainer.dens = type(trainer.dens)(**{**trainer.dens.__dict__, "coefficient_schedule": "linear_decay"})
    batch, out = corrupted_forward(trainer)
    trainer.epoch = trainer.config["optim"]["max_epochs"] / 4
    expected = energy_term(trainer, out, batch) + hand_hybrid(trainer, out, batch, weight_d=7.5)
    assert trainer._compute_loss(out, batch).item() == pytest.approx(expected.item(), rel=LOSS_REL)


def test_half_precision_predictions_are_reduced_in_float32(trainer_ctx):
    trainer = trainer_ctx.trainer
    batch, out = corrupted_forward(trainer)
    half = {k: v.half() for k, v in out.items()}
    loss = trainer._compute_loss(half, batch)
    assert loss.dtype == torch.float32
    as_float = {k: v.float() for k, v in half.items()}  # the same (rounded) values, in float32
    assert loss.item() == pytest.approx(trainer._compute_loss(as_float, batch).item(), rel=LOSS_REL)


def test_another_force_fn_keeps_one_form_in_every_batch_kind(emt_data, tmp_path):
    from fairchem_dens.testing import write_variant

    def mae(config):
        config["loss_functions"][1]["forces"]["fn"] = "mae"

    config = write_variant(DENS_YML, tmp_path / "mae.yml", mae)
    with fairchem_trainer(
        config, tmp_path, *data_overrides(emt_data), "--optim.denoising_pos_params.prob=1.0", "--optim.batch_size=3"
    ) as ctx:
        one_form_with_mae(ctx.trainer)


def one_form_with_mae(trainer):
    assert trainer.loss_functions[1][1]["fn"].loss_fn.__class__.__name__ == "MAELoss"
    batch, out = corrupted_forward(trainer)
    expected = energy_term(trainer, out, batch) + hand_hybrid(trainer, out, batch, fn="mae")
    assert trainer._compute_loss(out, batch).item() == pytest.approx(expected.item(), rel=LOSS_REL)
    # full corruption: the same rule with every counted atom weighted by lambda_D
    batch.noise_mask = batch.fixed == 0
    expected = energy_term(trainer, out, batch) + hand_hybrid(trainer, out, batch, fn="mae")
    free = batch.fixed == 0
    full = 10 * (out["forces"] - batch.noise_vec / 0.05)[free].abs().mean()
    assert expected.item() == pytest.approx((energy_term(trainer, out, batch) + full).item(), rel=LOSS_REL)
    assert trainer._compute_loss(out, batch).item() == pytest.approx(expected.item(), rel=LOSS_REL)


@pytest.mark.parametrize(
    "trainer_ctx",
    [["--outputs.forces.train_on_free_atoms=False", "--outputs.forces.eval_on_free_atoms=False"]],
    indirect=True,
)
def test_all_atoms_count_without_free_atom_training(trainer_ctx):
    trainer = trainer_ctx.trainer
    batch, out = corrupted_forward(trainer)
    everyone = torch.ones_like(batch.noise_mask)
    expected = energy_term(trainer, out, batch) + hand_hybrid(trainer, out, batch, atoms=everyone)
    assert trainer._compute_loss(out, batch).item() == pytest.approx(expected.item(), rel=LOSS_REL)
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    forces = trainer.normalizers["forces"].denorm(out["forces"].detach())
    clean = ~batch.noise_mask  # fixed atoms are never corrupted: they count as clean atoms here
    assert bool((clean & (batch.fixed == 1)).any())
    force_mae = (forces - batch.forces)[clean].abs().mean()
    assert metrics["denoising_force_mae"]["metric"] == pytest.approx(force_mae.item(), rel=LOSS_REL)
    assert metrics["denoising_force_mae"]["numel"] == 3 * int(clean.sum())


@pytest.mark.parametrize(
    "trainer_ctx",
    [
        [
            "--optim.denoising_pos_params.output_policy.energy=excluded",
            "--optim.denoising_pos_params.selection=structure",
            "--optim.denoising_pos_params.prob=0.5",
            "--optim.denoising_pos_params.corrupt_ratio=None",
        ]
    ],
    indirect=True,
)
def test_excluded_outputs_leave_out_corrupted_structures_only(trainer_ctx):
    trainer = trainer_ctx.trainer
    assert trainer.output_roles == {"energy": "excluded", "forces": "replaced"}
    batch, corrupted = mixed_dens_batch(trainer)
    trainer.model.eval()
    out = trainer._forward(batch)
    free = batch.fixed == 0
    forces_term = hand_hybrid(trainer, out, batch)
    expected = energy_term(trainer, out, batch, structures=~corrupted) + forces_term
    loss = trainer._compute_loss(out, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=LOSS_REL)
    # clean structures keep their energy gradient, corrupted ones get none from the energy term
    energy = out["energy"]
    grad = torch.autograd.grad(loss, energy, retain_graph=True)[0].view(-1)
    assert bool((grad[~corrupted] != 0).all()) and bool((grad[corrupted] == 0).all())
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    assert "denoising_energy_mae" not in metrics
    energies = trainer.normalizers["energy"].denorm(energy.detach().view(-1))
    clean_mae = (energies - batch.energy.view(-1))[~corrupted].abs().mean()
    assert metrics["energy_mae"]["metric"] == pytest.approx(clean_mae.item(), rel=LOSS_REL)
    assert metrics["energy_mae"]["numel"] == int((~corrupted).sum())
    assert free.any()


@pytest.mark.parametrize(
    "trainer_ctx",
    [["--optim.denoising_pos_params.selection=structure", "--optim.denoising_pos_params.prob=0.5"]],
    indirect=True,
)
def test_per_structure_selection_differs_between_ranks(trainer_ctx):
    trainer = trainer_ctx.trainer
    differ = 0
    for step in range(8):
        masks = []
        for rank in (0, 1):
            batch = first_batch(trainer)
            trainer.corrupt(batch, step=step, rank=rank)
            masks.append(getattr(batch, "noise_mask", torch.zeros(batch.pos.shape[0], dtype=torch.bool)))
        differ += not torch.equal(*masks)
    assert differ >= 6


def test_validation_and_prediction_never_corrupt(trainer_ctx):
    trainer = trainer_ctx.trainer
    seen = []
    original = trainer.model.forward

    def spy(batch):
        seen.append(is_dens_batch(batch))
        return original(batch)

    trainer.model.forward = spy
    metrics = trainer.validate(split="val", disable_tqdm=True)
    standard = [k for k in metrics if not k.startswith("denoising")]
    assert "forces_mae" in standard and "energy_mae" in standard
    n_standard = len(seen)
    n_dens = len(trainer.val_loader)
    assert n_standard > n_dens and not any(seen[:-n_dens]) and all(seen[-n_dens:])
    # the optional denoising validation (enabled in the quickstart config) runs afterwards,
    # on corrupted copies, with a fixed seed: the same numbers twice
    assert {"denoising_pos_mae", "denoising_energy_mae"} <= set(metrics)
    again = trainer.validate_denoising("val")
    assert again["denoising_pos_mae"]["metric"] == pytest.approx(metrics["denoising_pos_mae"]["metric"], rel=LOSS_REL)
    seen.clear()
    trainer.predict(trainer.test_loader, results_file="predictions", disable_tqdm=True)
    assert seen and not any(seen)


def test_batch_decision_is_the_same_on_every_rank(trainer_ctx):
    trainer = trainer_ctx.trainer
    trainer.dens = type(trainer.dens)(**{**trainer.dens.__dict__, "prob": 0.5})
    for step in range(12):
        decisions = set()
        for rank in range(4):
            batch = first_batch(trainer)
            decisions.add(trainer.corrupt(batch, step=step, rank=rank))
        assert len(decisions) == 1


def test_dataset_without_forces_is_refused(emt_data, tmp_path):
    from fairchem_dens.testing import lmdb_without

    folder = lmdb_without(emt_data["val"], "forces", tmp_path / "no_forces")
    with (
        pytest.raises(ValueError, match=r"has no `forces`"),
        fairchem_trainer(
            DENS_YML,
            tmp_path / "run",
            f"--dataset.train.src={folder}",
            f"--dataset.val.src={emt_data['val']}",
            f"--dataset.test.src={emt_data['test']}",
        ),
    ):
        pass


@pytest.mark.parametrize("trainer_ctx", [["--optim.denoising_pos_params.early_epochs=1"]], indirect=True)
def test_early_epochs_stop_denoising(trainer_ctx):
    trainer = trainer_ctx.trainer
    trainer.model.train()
    steps = len(trainer.train_loader)
    for step, expected in ((1, True), (steps, True), (steps + 1, False), (3 * steps, False)):
        trainer.step = step
        batch = first_batch(trainer)
        trainer._forward(batch)
        assert is_dens_batch(batch) == expected, step


@pytest.mark.parametrize("trainer_ctx", [["--optim.denoising_pos_params.loss_form=separate_means"]], indirect=True)
def test_separate_means_loss_form_of_the_md17_recipe(trainer_ctx):
    trainer = trainer_ctx.trainer
    batch, out = corrupted_forward(trainer)
    free, mask = batch.fixed == 0, batch.noise_mask
    noise_term = (out["forces"] - batch.noise_vec / 0.05).norm(dim=-1)[free & mask].mean()
    force_target = trainer.normalizers["forces"].norm(batch.forces)
    force_term = (out["forces"] - force_target).norm(dim=-1)[free & ~mask].mean()
    expected = energy_term(trainer, out, batch) + 10 * noise_term + 100 * force_term
    assert trainer._compute_loss(out, batch).item() == pytest.approx(expected.item(), rel=LOSS_REL)
    # a batch without corrupted atoms: the noise term is dropped, not NaN
    clean = first_batch(trainer)
    out = trainer._forward(clean)
    fairchem_loss = super(DeNSTrainer, trainer)._compute_loss(out, clean)
    assert trainer._compute_loss(out, clean).item() == pytest.approx(fairchem_loss.item(), rel=LOSS_REL)


def _train_labels(trainer, name):
    return torch.cat(
        [torch.as_tensor(trainer.train_dataset[i][name]).reshape(-1) for i in range(len(trainer.train_dataset))]
    ).double()


@pytest.mark.parametrize(
    "trainer_ctx", [["--dataset.train.transforms.normalizer.fit.targets.forces.rmsd=energy"]], indirect=True
)
def test_force_normalizer_can_take_the_energy_std(trainer_ctx):
    # docs/algorithm.md#md17-recipe: the MD17 code divides forces by the training-set energy std.
    trainer = trainer_ctx.trainer
    energies = _train_labels(trainer, "energy")
    assert trainer.normalizers["forces"].rmsd.item() == pytest.approx(energies.std().item(), rel=FIT_STATISTICS_REL)
    assert trainer.normalizers["forces"].mean.item() == 0.0
    assert trainer.normalizers["energy"].rmsd.item() == pytest.approx(energies.std().item(), rel=FIT_STATISTICS_REL)
    force_rms = _train_labels(trainer, "forces").pow(2).mean().sqrt().item()
    assert abs(force_rms - energies.std().item()) > 0.1 * force_rms  # the tie changed the value
    # the saved config still says where the value came from
    fit = trainer.config["dataset"]["transforms"]["normalizer"]["fit"]
    assert fit["override_values"]["forces"] == {"mean": 0.0, "rmsd": "energy"}
    batch = first_batch(trainer)
    target = trainer.normalizers["forces"].norm(batch.forces)
    assert torch.allclose(target, batch.forces / energies.std().float(), rtol=FIT_STATISTICS_REL, atol=0)
    # fairchem's normalizers.pt beside the checkpoints holds the tied value too
    saved = torch.load(trainer.config["cmd"]["checkpoint_dir"] + "/normalizers.pt", weights_only=False)
    assert saved["forces"].rmsd.item() == trainer.normalizers["forces"].rmsd.item()


def test_an_included_tie_can_be_undone_from_the_command_line(emt_data, tmp_path):
    tied = tmp_path / "tied.yml"
    tied.write_text(
        f"includes:\n  - {DENS_YML}\ndataset:\n  train:\n    transforms:\n      normalizer:\n"
        "        fit:\n          targets:\n            forces: {mean: 0.0, rmsd: energy}\n"
    )
    with fairchem_trainer(tied, tmp_path / "a", *data_overrides(emt_data)) as ctx:
        normalizers = ctx.trainer.normalizers
        assert normalizers["forces"].rmsd.item() == normalizers["energy"].rmsd.item()
    with fairchem_trainer(
        tied,
        tmp_path / "b",
        *data_overrides(emt_data),
        "--dataset.train.transforms.normalizer.fit.targets.forces.rmsd=None",
    ) as ctx:
        squares = _train_labels(ctx.trainer, "forces").pow(2).sum().item()
        atoms = sum(len(ctx.trainer.train_dataset[i].forces) for i in range(len(ctx.trainer.train_dataset)))
        # fairchem's own fit: rms of the per-atom force vector, with its n - 1 quirk
        expected = (squares / (atoms - 1)) ** 0.5
        assert ctx.trainer.normalizers["forces"].rmsd.item() == pytest.approx(expected, rel=FIT_STATISTICS_REL)


@pytest.mark.parametrize("source", ["stress", "forces"])
def test_force_normalizer_tie_to_an_unfitted_target_is_refused(emt_data, tmp_path, source):
    with pytest.raises(ValueError, match=rf"normalizer\.fit\.targets\.forces\.rmsd is '{source}'.*energy"):
        with fairchem_trainer(
            DENS_YML,
            tmp_path,
            *data_overrides(emt_data),
            f"--dataset.train.transforms.normalizer.fit.targets.forces.rmsd={source}",
        ):
            pass
