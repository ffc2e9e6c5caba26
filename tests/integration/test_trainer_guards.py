"""What the DeNS trainer refuses before step 1, and what it stops on, through fairchem's CLI code path."""

from __future__ import annotations

import logging

import pytest

from fairchem_dens.core.errors import DeNSConfigError
from fairchem_dens.testing import fairchem_trainer, write_variant
from fairchem_dens.testing.tolerances import ELEMENTWISE_ULPS, F32_STORAGE_REL, LOSS_REL, assert_ulps
from fairchem_dens.trainers.dens import DeNSSetupError, NonFiniteLossError

from helpers import DATA, QUICKSTART, data_overrides

DENS_YML = QUICKSTART / "eqv2_dens_tiny.yml"
P = "--optim.denoising_pos_params."
DENS_KEYS = [
    "--trainer=fairchem_dens.trainers.dens.DeNSTrainer",
    "--optim.use_denoising_pos=True",
    f"{P}prob=0.5",
    f"{P}fixed_noise_std=True",
    f"{P}std=0.05",
    "--optim.denoising_pos_coefficient=10",
]


def build(config, tmp_path, emt_data, *overrides):
    """Builds a trainer and closes it again (for configs that must be refused while building)."""
    with fairchem_trainer(config, tmp_path / "run", *data_overrides(emt_data), *overrides) as ctx:
        return ctx.trainer


def trainer_for(config, tmp_path, emt_data, *overrides):
    return fairchem_trainer(config, tmp_path / "run", *data_overrides(emt_data), *overrides)


# ------------------------------------------------------------------ config and model
@pytest.mark.parametrize("missing", ["energy", "forces"])
def test_config_without_energy_or_forces_is_refused(emt_data, tmp_path, missing):
    def drop(config):
        del config["outputs"][missing]
        config["loss_functions"] = [e for e in config["loss_functions"] if missing not in e]
        config["evaluation_metrics"]["metrics"].pop(missing)

    config = write_variant(DENS_YML, tmp_path / "c.yml", drop)
    with pytest.raises(DeNSConfigError, match=rf"no `{missing}` output: DeNS predicts the energy"):
        build(config, tmp_path, emt_data)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("stres=excluded", r"names stres, which the config's `outputs` does not have"),
        ("energy=ignored", r"output_policy.energy must be one of original, replaced, excluded"),
        ("forces=excluded", r"only `forces` is replaced"),
        ("energy=replaced", r"only `forces` is replaced"),
    ],
)
def test_output_policy_is_validated(emt_data, tmp_path, policy, message):
    with pytest.raises(DeNSConfigError, match=message):
        build(DENS_YML, tmp_path, emt_data, f"{P}output_policy.{policy}")


@pytest.mark.parametrize(("setting", "what"), [("prob", "no batch or structure"), ("corrupt_ratio", "no atom")])
def test_settings_that_switch_dens_off_while_it_is_on_are_refused(emt_data, tmp_path, setting, what):
    with pytest.raises(
        DeNSConfigError,
        match=rf"optim.denoising_pos_params.{setting} is 0 while optim.use_denoising_pos "
        rf"is true: {what} would ever be corrupted.*use_denoising_pos: False",
    ):
        build(DENS_YML, tmp_path, emt_data, f"{P}{setting}=0")
    assert not (tmp_path / "run").exists()  # refused before fairchem made the run folder


def test_plain_equiformer_v2_is_refused(emt_data, tmp_path):
    with pytest.raises(
        DeNSSetupError, match=r"EquiformerV2Backbone, which has no force encoding.*DeNSEquiformerV2Backbone"
    ):
        build(QUICKSTART / "eqv2_tiny.yml", tmp_path, emt_data, *DENS_KEYS)


def test_fairchem_heads_without_a_noise_output_are_refused(emt_data, tmp_path):
    with pytest.raises(
        DeNSSetupError, match=r"EqV2VectorHead, which has no noise output.*DeNSEquiformerV2ForceHead.*DeNSeSENForceHead"
    ):
        build(
            DENS_YML,
            tmp_path,
            emt_data,
            "--model.heads.forces.module=equiformerV2_vector_head",
            "--model.heads.energy.module=equiformerV2_scalar_head",
        )


def _esen(head: str, backbone: str = "esen_backbone"):
    def edit(config):
        config["model"] = {
            "name": "hydra",
            "otf_graph": True,
            "pass_through_head_outputs": True,
            "backbone": {
                "model": backbone,
                "sphere_channels": 8,
                "lmax": 1,
                "mmax": 1,
                "num_layers": 1,
                "hidden_channels": 8,
                "edge_channels": 8,
                "num_distance_basis": 8,
                "cutoff": 5.0,
                "max_neighbors": 12,
                "otf_graph": True,
            },
            "heads": {"efs": {"module": head}},
        }

    return edit


def test_a_conservative_model_without_a_noise_head_is_refused(emt_data, tmp_path):
    config = write_variant(DENS_YML, tmp_path / "c.yml", _esen("esen_mlp_efs_head"))
    with pytest.raises(
        DeNSSetupError,
        match=r"forces are gradients of its energy \(.*MLP_EFS_Head, a conservative "
        r"head without a noise output\).*DeNSeSENConservativeHead",
    ):
        build(config, tmp_path, emt_data)


def test_fairchems_esen_dens_head_that_zeroes_the_energy_is_refused(emt_data, tmp_path):
    config = write_variant(DENS_YML, tmp_path / "c.yml", _esen("esen_mlp_efs_head_dens", "esen_backbone_dens"))
    with pytest.raises(
        DeNSSetupError,
        match=r"esen_dens.MLP_EFS_Head, which multiplies the energy of every DeNS "
        r"batch by 0.*DeNSeSENConservativeHead \(same weights\)",
    ):
        build(config, tmp_path, emt_data)


TIED_FORCES = "--dataset.train.transforms.normalizer.fit.targets.forces.rmsd=energy"
OUR_CONSERVATIVE = _esen(
    "fairchem_dens.models.esen.DeNSeSENConservativeHead", "fairchem_dens.models.esen.DeNSeSENBackbone"
)


def test_our_conservative_esen_head_is_accepted(emt_data, tmp_path):
    with fairchem_trainer(
        write_variant(DENS_YML, tmp_path / "c.yml", OUR_CONSERVATIVE), tmp_path, *data_overrides(emt_data), TIED_FORCES
    ) as ctx:
        assert ctx.trainer.model.module.backbone.direct_forces is False  # gradient forces, noise head kept
        normalizers = ctx.trainer.normalizers
        assert normalizers["forces"].rmsd.item() == normalizers["energy"].rmsd.item()


def test_a_conservative_model_with_its_own_force_normalizer_is_refused(emt_data, tmp_path):
    # -dE/dx of the normalised energy is in units of the energy rmsd: a separately fitted force
    # rmsd gives targets no energy can fit (training would run, with wrongly scaled forces).
    config = write_variant(DENS_YML, tmp_path / "c.yml", OUR_CONSERVATIVE)
    with pytest.raises(
        DeNSSetupError,
        match=r"`forces` output is a gradient of its normalised energy.*`forces` normalizer has "
        r"mean 0 and rmsd [0-9.]+.*`forces: \{mean: 0.0, rmsd: energy\}`",
    ):
        build(config, tmp_path, emt_data)
    # the same holds for plain training with the DeNS trainer
    with pytest.raises(DeNSSetupError, match=r"`forces` normalizer"):
        build(config, tmp_path, emt_data, "--optim.use_denoising_pos=False")


def test_forces_loss_per_atom_mae_is_refused(emt_data, tmp_path):
    def per_atom(config):
        config["loss_functions"][1]["forces"]["fn"] = "per_atom_mae"

    with pytest.raises(DeNSSetupError, match=r"loss_functions.forces.fn is per_atom_mae"):
        build(write_variant(DENS_YML, tmp_path / "c.yml", per_atom), tmp_path, emt_data)


def test_plain_model_is_fine_when_denoising_is_off(emt_data, tmp_path):
    keys = [k for k in DENS_KEYS if "use_denoising_pos" not in k]
    trainer = build(QUICKSTART / "eqv2_tiny.yml", tmp_path, emt_data, *keys, "--optim.use_denoising_pos=False")
    assert not trainer.dens.enabled


# ------------------------------------------------------------------ data, normalisers, schedules
def test_single_frame_normalizer_fit_is_refused(emt_data, tmp_path):
    # fairchem's `ase_read` reads only the first frame of this 4-frame file: the fit sees one sample
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "frames.extxyz").write_text((DATA / "inputs.extxyz").read_text())
    with pytest.raises(DeNSSetupError, match=r"normalizer of `energy` has rmsd 0.0 \(fitted on 1 training sample"):
        build(
            DENS_YML,
            tmp_path,
            emt_data,
            "--dataset.train.format=ase_read",
            f"--dataset.train.src={folder}",
            "--dataset.train.pattern=*.extxyz",
            "--dataset.train.a2g_args.r_energy=True",
            "--dataset.train.a2g_args.r_forces=True",
            "--optim.load_balancing_on_error=warn_and_no_balance",
        )


def test_warmup_shorter_than_one_step_is_refused(emt_data, tmp_path):
    with pytest.raises(DeNSSetupError, match=r"warmup_epochs = 0.01 epochs x \d+ steps per epoch = 0 warm-up steps"):
        build(DENS_YML, tmp_path, emt_data, "--optim.scheduler_params.warmup_epochs=0.01")


def test_validation_sets_without_md_are_refused_when_validating_relaxations_only(emt_data, tmp_path):
    from fairchem_dens.testing import lmdb_without

    val = lmdb_without(emt_data["val"], "md", tmp_path / "val_without_md")
    with pytest.raises(ValueError, match=r"validate_denoising and relaxation_only are set but the val dataset"):
        build(
            DENS_YML,
            tmp_path,
            emt_data,
            f"{P}relaxation_only=True",
            f"{P}validate_denoising=True",
            f"--dataset.val.src={val}",
        )


# ------------------------------------------------------------------ non-finite values
def dens_batch(trainer, corrupt_ratio):
    trainer.dens = type(trainer.dens)(**{**trainer.dens.__dict__, "prob": 1.0, "corrupt_ratio": corrupt_ratio})
    batch = next(iter(trainer.train_loader))
    if corrupt_ratio != 0.0:
        assert trainer.corrupt(batch, step=1)
    return batch


@pytest.mark.parametrize(
    ("kind", "ratio", "output", "what"),
    [
        ("S2EF", 0.0, "energy", "prediction"),
        ("S2EF", 0.0, "forces", "prediction"),
        ("S2EF", 0.0, "energy", "target"),
        ("full-corruption", None, "forces", "prediction"),
        ("partial-corruption", 0.5, "forces", "prediction"),
        ("partial-corruption", 0.5, "energy", "prediction"),
    ],
)
def test_non_finite_values_are_named_before_fairchems_nan_to_num(emt_data, tmp_path, kind, ratio, output, what):
    with trainer_for(DENS_YML, tmp_path, emt_data, "--optim.batch_size=4") as ctx:
        trainer = ctx.trainer
        batch = dens_batch(trainer, ratio)
        trainer.model.eval()
        out = trainer._forward(batch)
        if what == "prediction":
            out = {**out, output: out[output].detach().clone().contiguous()}
            out[output].view(-1)[0] = float("nan")
        else:
            batch[output] = batch[output].clone()
            batch[output].view(-1)[0] = float("inf")
        with pytest.raises(NonFiniteLossError, match=rf"`{output}` {what} has 1 NaN/inf value\(s\) in a {kind} batch"):
            trainer._compute_loss(out, batch)


# ------------------------------------------------------------------ noise scale on resume
def test_resumed_noise_scale_follows_the_config(emt_data, tmp_path, caplog):
    with trainer_for(DENS_YML, tmp_path / "a", emt_data) as ctx:
        path = ctx.trainer.save(checkpoint_file="checkpoint.pt")
    with trainer_for(DENS_YML, tmp_path / "b", emt_data, f"{P}std=0.1", f"{P}prob=1.0") as ctx:
        resumed_noise_scale_follows_the_config(ctx.trainer, path, caplog)


def resumed_noise_scale_follows_the_config(trainer, path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer.load_checkpoint(path)
    assert "noise scale sigma_N = 0.05 Å" in caplog.text and "this config sets 0.1 Å" in caplog.text
    assert trainer.normalizers["denoising_pos_target"].rmsd.item() == pytest.approx(0.1, rel=F32_STORAGE_REL)
    batch = next(iter(trainer.train_loader))
    assert trainer.corrupt(batch, step=3)
    assert_ulps(batch.denoising_target, batch.noise_vec / 0.1, ELEMENTWISE_ULPS, what="target")
    trainer.model.eval()
    out = trainer._forward(batch)
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    counted = (batch.fixed == 0) & batch.noise_mask
    expected = (out["forces"].detach() * 0.1 - batch.noise_vec)[counted].abs().mean()
    assert metrics["denoising_pos_mae"]["metric"] == pytest.approx(expected.item(), rel=LOSS_REL)
