"""Checkpoints of the original DeNS code and of fairchem's port, in our models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairchem_dens.models.checkpoints import CheckpointMismatchError, checkpoint_family, explain_mismatch
from fairchem_dens.testing import (
    batch_from_tensors,
    build_model,
    eqv2_dens_model_config,
    fairchem_trainer,
    forward_seeded,
)
from fairchem_dens.testing.tolerances import (
    EQV2_OTHER_SEED_ATOL_EV,
    F32_STORAGE_REL,
    NEIGHBOUR_TIES_ENERGY_EV,
    ORIGINAL_PARITY_ULPS,
    REORDERED_ULPS,
    assert_ulps,
)

from helpers import (
    DATA,
    MODELS,
    MODES,
    ORIGINAL,
    QUICKSTART,
    converted_model,
    data_overrides,
    fixture_case,
    reference,
    sphere_sample_scale,
)

# The weight the negative control scales by 1 + 1e-4: one of the force head's (~190 ulps of
# max |F|, 3x the parity tolerance; most single weights move the forces by ~1 ulp).
SENSITIVE_WEIGHT = {
    "eqv2_dens": "output_heads.forces.vector_block.so2_conv_1.rad_func.net.1.weight",
    "escn_dens": "output_heads.forces.force_block.fc3.weight",
}


def assert_equals_original(model, ref, mode, case=None, force_scale=None):
    """The seeded forward of ``model`` on a fixture case equals the original's outputs to float32 round-off.

    ``case``: the reference's name of the outputs (default ``mode``); ``force_scale``: the
    scale of the forces' round-off where it is not max |F| (see ``sphere_sample_scale``).
    """
    case = case or mode
    with torch.no_grad():
        out = forward_seeded(model, fixture_case(ref, mode), int(ref["forward_seed"]))
    assert_ulps(out["energy"], ref[f"{case}_energy"], ORIGINAL_PARITY_ULPS, what=f"{case} energy")
    assert_ulps(out["forces"], ref[f"{case}_forces"], ORIGINAL_PARITY_ULPS, scale=force_scale, what=f"{case} forces")


@pytest.mark.parametrize("name", MODELS)
def test_outputs_equal_the_original_implementation(name, monkeypatch):
    ref = reference(name)
    model, _ = converted_model(ORIGINAL / name / "checkpoint.pt")
    for mode in MODES:
        assert_equals_original(model, ref, mode)
    # negative control: one weight off by 1e-4 relative fails the same comparison
    monkeypatch.delenv("DENS_ULPS_LOG", raising=False)  # its deviation is not round-off
    weight = model.state_dict()[SENSITIVE_WEIGHT[name]].view(-1)
    with torch.no_grad():
        weight[weight.abs().argmax()] *= 1 + 1e-4
    with pytest.raises(AssertionError, match="s2ef forces: .* ulps"):
        assert_equals_original(model, ref, "s2ef")


@pytest.mark.parametrize("name", MODELS)
def test_ema_weights_are_reordered_correctly(name):
    ref = reference(name)
    from_ema, _ = converted_model(ORIGINAL / name / "checkpoint.pt", use_ema=True)
    best, _ = converted_model(ORIGINAL / name / "best_checkpoint.pt")  # EMA weights saved as state_dict
    for (key, a), b in zip(from_ema.state_dict().items(), best.state_dict().values()):
        assert torch.equal(a, b), key
    force_scale = sphere_sample_scale(best, ref) if name == "escn_dens" else None
    assert_equals_original(best, ref, "s2ef", case="s2ef_ema", force_scale=force_scale)
    names = json.loads((ORIGINAL / name / "ema_param_names.json").read_text())
    assert len(names) == sum(1 for p in best.parameters() if p.requires_grad)


def test_ddp_prefixed_checkpoint_loads():
    ref = reference("eqv2_dens")
    model, converted = converted_model(ORIGINAL / "eqv2_dens" / "best_checkpoint_ddp_prefixed.pt")
    assert not any(k.startswith("module.") for k in converted["state_dict"])
    assert_equals_original(model, ref, "s2ef", case="s2ef_ema")


def test_conversion_rewrites_config_and_normalizers():
    _, converted = converted_model(ORIGINAL / "eqv2_dens" / "checkpoint.pt")
    config = converted["config"]
    assert config["trainer"] == "forces"
    assert config["model"]["backbone"]["model"] == "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone"
    assert config["model"]["backbone"]["avg_num_nodes"] == 77.81317  # the original class default, as written
    assert "model_attributes" not in config and "use_tp_reparam" not in config["model"]["backbone"]
    assert set(converted["normalizers"]["denoising_pos_target"]) == {"mean", "rmsd"}
    rmsd = converted["normalizers"]["denoising_pos_target"]["rmsd"]
    assert rmsd.item() == pytest.approx(0.1, rel=F32_STORAGE_REL)  # a float32 tensor
    assert "optimizer" not in converted and converted["step"] == 2


def test_every_adapter_recognises_its_checkpoints_and_others_are_named():
    from fairchem_dens.testing import escn_dens_model_config, esen_dens_model_config

    for family, config in (
        ("equiformer_v2", eqv2_dens_model_config("ours")),
        ("escn", escn_dens_model_config("ours")),
        ("esen", esen_dens_model_config("ours")),
        ("esen", esen_dens_model_config("fairchem")),
    ):
        state = {f"module.{k}": v for k, v in build_model(config).state_dict().items()}  # as DDP saves them
        assert checkpoint_family({"state_dict": state}) == ("hydra", family)
    painn = build_model(
        {
            "name": "hydra",
            "backbone": {
                "model": "fairchem.core.models.painn.painn.PaiNNBackbone",
                "hidden_channels": 8,
                "num_layers": 1,
                "num_rbf": 8,
                "otf_graph": True,
            },
            "heads": {"energy": {"module": "fairchem.core.models.painn.painn.PaiNNEnergyHead"}},
        }
    )
    with pytest.raises(
        CheckpointMismatchError,
        match=r"none of the architectures fairchem-dens has a DeNS adapter "
        r"for \(EquiformerV2, eSCN, eSEN\).*docs/backbones.md#adding-a-backbone",
    ):
        checkpoint_family({"state_dict": painn.state_dict()})
    esen = build_model(esen_dens_model_config("ours")).state_dict()
    eqv2 = build_model(eqv2_dens_model_config("ours")).state_dict()
    assert "holds an eSEN model but the config builds an EquiformerV2" in explain_mismatch(eqv2, esen)
    monolithic = {k[len("backbone.") :]: v for k, v in esen.items() if k.startswith("backbone.")}
    with pytest.raises(CheckpointMismatchError, match="monolithic eSEN model"):
        checkpoint_family({"state_dict": monolithic})


def test_first_release_head_names_still_build_and_load(fixture_batch):
    """DeNSEnergyHead / DeNSForceHead (configs written for the first releases) are the renamed classes."""
    from fairchem_dens.models import equiformer_v2

    assert equiformer_v2.DeNSEnergyHead is equiformer_v2.DeNSEquiformerV2EnergyHead
    assert equiformer_v2.DeNSForceHead is equiformer_v2.DeNSEquiformerV2ForceHead
    old = eqv2_dens_model_config("ours")
    old["heads"] = {
        "energy": {"module": "fairchem_dens.models.equiformer_v2.DeNSEnergyHead"},
        "forces": {"module": "fairchem_dens.models.equiformer_v2.DeNSForceHead"},
    }
    old_model, new_model = build_model(old, seed=0).eval(), build_model(eqv2_dens_model_config("ours"), seed=1).eval()
    new_model.load_state_dict(old_model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            forward_seeded(old_model, fixture_batch)["forces"],
            forward_seeded(new_model, fixture_batch)["forces"],
            atol=0,
            rtol=0,
        )


def test_mismatches_are_explained():
    eqv2 = build_model(eqv2_dens_model_config("ours")).state_dict()
    escn, _ = converted_model(ORIGINAL / "escn_dens" / "checkpoint.pt")
    assert "holds an eSCN model but the config builds an EquiformerV2" in explain_mismatch(eqv2, escn.state_dict())
    plain = {k: v for k, v in eqv2.items() if "force_embedding" not in k and "denoising_pos_block" not in k}
    message = explain_mismatch(eqv2, plain)
    assert "backbone.force_embedding" in message and "output_heads.forces.denoising_pos_block" in message
    assert "missing from the checkpoint" in message and "plain" in message
    sigma = build_model(eqv2_dens_model_config("ours", use_noise_schedule_sigma_encoding=True)).state_dict()
    assert "use_noise_schedule_sigma_encoding" in explain_mismatch(sigma, eqv2)
    bigger = build_model(
        eqv2_dens_model_config(
            "ours", backbone={**eqv2_dens_model_config("ours")["backbone"], "lmax_list": [3], "model": None}
        )
    ).state_dict()
    message = explain_mismatch(bigger, eqv2)
    assert "- backbone.force_embedding: 2 tensors differ in shape" in message
    assert "checkpoint shape (3, 16, 1), model shape (4, 16, 1)" in explain_mismatch(
        {"backbone.force_embedding.weight": bigger["backbone.force_embedding.weight"]},
        {"backbone.force_embedding.weight": eqv2["backbone.force_embedding.weight"]},
    )


def test_convert_checkpoint_command(tmp_path):
    source = ORIGINAL / "escn_dens" / "checkpoint.pt"
    target = tmp_path / "escn_converted.pt"
    command = [sys.executable, "-m", "fairchem_dens.cli", "convert-checkpoint", str(source), str(target)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    converted = torch.load(target, weights_only=True)  # what we write is weights-only loadable
    assert converted["config"]["model"]["backbone"]["model"] == "fairchem_dens.models.escn.DeNSeSCNBackbone"
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr  # nothing already written is lost
    assert [path.name for path in tmp_path.iterdir()] == [target.name]  # no temp file left


def test_ase_calculator_uses_a_converted_checkpoint(tmp_path):
    from ase.io import read
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    ref = reference("eqv2_dens")
    target = tmp_path / "eqv2.pt"
    # best_checkpoint.pt holds the EMA weights, which the original predict() used
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "convert-checkpoint",
            str(ORIGINAL / "eqv2_dens" / "best_checkpoint.pt"),
            str(target),
        ],
        check=True,
        capture_output=True,
    )
    calculator = OCPCalculator(checkpoint_path=str(target), cpu=True, seed=0)
    atoms = read(DATA / "inputs.extxyz", index=0)
    atoms.calc = calculator
    natoms = len(atoms)
    # the original trainer's predict(): EMA weights, denormalised (eV, eV/Å)
    assert atoms.get_potential_energy() == pytest.approx(ref["predict_energy"][0], abs=NEIGHBOUR_TIES_ENERGY_EV)
    # Forces: against the converted model on the same single structure. Alone, the
    # structure's neighbour list breaks max_neighbors ties (ideal lattice sites)
    # differently than inside the 4-structure batch of the reference (2e-2 eV/Å).
    tensors = torch.load(DATA / "inputs.pt", weights_only=True)
    single = {k: (v[:natoms] if v.shape[0] == 64 else v[:1]) for k, v in tensors.items()}
    model, converted = converted_model(ORIGINAL / "eqv2_dens" / "best_checkpoint.pt")
    with torch.no_grad():
        out = forward_seeded(model, batch_from_tensors(single))
    rmsd = converted["normalizers"]["forces"]["rmsd"].item()
    # the calculator seeds 0 once, forward_seeded 7: other random edge frames
    np.testing.assert_allclose(
        atoms.get_forces(apply_constraint=False), out["forces"].numpy() * rmsd, atol=EQV2_OTHER_SEED_ATOL_EV
    )


def test_fairchem_port_checkpoints_load_both_ways(emt_data, tmp_path):
    port_yml = DATA / "fairchem_port_dens.yml"
    with fairchem_trainer(
        port_yml, tmp_path / "port", *data_overrides(emt_data), "--optim.max_epochs=1", "--optim.batch_size=8"
    ) as ctx:
        ctx.task.setup(ctx.trainer)
        ctx.task.run()  # one real epoch of fairchem's own DeNS trainer
        port_model = ctx.trainer._unwrapped_model
        port_checkpoint = tmp_path / "port" / "checkpoints" / "test" / "checkpoint.pt"
        batch = fixture_case(reference("eqv2_dens"), "dens_partial")
        port_model.eval()
        with torch.no_grad():
            expected = forward_seeded(port_model, batch)
    assert port_checkpoint.exists()
    with fairchem_trainer(QUICKSTART / "eqv2_dens_tiny.yml", tmp_path / "ours", *data_overrides(emt_data)) as ctx:
        ctx.trainer.load_checkpoint(str(port_checkpoint))
        ours = ctx.trainer._unwrapped_model.eval()
        with torch.no_grad():
            got = forward_seeded(ours, batch)
        assert_ulps(got["energy"], expected["energy"], REORDERED_ULPS, what="energy")
        assert_ulps(got["forces"], expected["forces"], REORDERED_ULPS, what="forces")
        ctx.trainer.save(checkpoint_file="ours.pt", training_state=True)
        ours_checkpoint = Path(ctx.trainer.config["cmd"]["checkpoint_dir"]) / "ours.pt"
    with fairchem_trainer(port_yml, tmp_path / "port2", *data_overrides(emt_data)) as ctx:
        ctx.trainer.load_checkpoint(str(ours_checkpoint))  # fairchem's own loader, strict
        theirs = ctx.trainer._unwrapped_model.eval()
        with torch.no_grad():
            back = forward_seeded(theirs, batch)
        assert_ulps(back["forces"], expected["forces"], REORDERED_ULPS, what="forces")


def test_wrong_checkpoint_fails_with_a_named_mismatch(emt_data, tmp_path):
    with fairchem_trainer(QUICKSTART / "eqv2_dens_tiny.yml", tmp_path, *data_overrides(emt_data)) as ctx:
        with pytest.raises(CheckpointMismatchError, match="holds an eSCN model"):
            ctx.trainer.load_checkpoint(str(ORIGINAL / "escn_dens" / "checkpoint.pt"))
        # the fixture model has attn_value_channels 8, the quickstart one 4
        with pytest.raises(CheckpointMismatchError, match=r"backbone.blocks: 8 tensors differ in shape.*\(3, 16, 16\)"):
            ctx.trainer.load_checkpoint(str(ORIGINAL / "eqv2_dens" / "checkpoint.pt"))
