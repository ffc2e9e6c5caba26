"""eSEN beyond the shared backbone suite: parity with fairchem's eSEN DeNS classes, conservative
DeNS that trains what fairchem's zeroes, and the two-step recipe (direct DeNS -> conservative)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fairchem_dens.core.batch import corrupted_structures
from fairchem_dens.models.checkpoints import CheckpointMismatchError, read_checkpoint, strip_ddp_prefix
from fairchem_dens.models.to_conservative import conservative_finetune_checkpoint
from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.testing import (
    build_model,
    corrupt_like_trainer,
    dens_mode_batch,
    esen_dens_model_config,
    forward_seeded,
)
from fairchem_dens.testing.tolerances import EPS32, GRADIENT_ULPS, REORDERED_ULPS, assert_ulps

from helpers import QUICKSTART


def _pair(flavour: str):
    ours = build_model(esen_dens_model_config(flavour), seed=0)
    theirs = build_model(esen_dens_model_config(flavour.replace("ours", "fairchem")), seed=1)
    with torch.no_grad():
        theirs.backbone.force_embedding.weight.normal_()
        theirs.backbone.force_embedding.bias.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # fairchem's weights, names unchanged
    return ours, theirs


def _outputs(model, batch):
    return forward_seeded(model, batch.clone(), seed=7)  # same edge-frame draws for both models


@pytest.mark.parametrize("mode", ["s2ef", "full", "partial"])
def test_direct_outputs_equal_fairchems_esen_dens(fixture_batch, mode):
    ours, theirs = _pair("ours")
    batch = dens_mode_batch(fixture_batch, mode)
    with torch.no_grad():
        a, b = _outputs(ours.eval(), batch), _outputs(theirs.eval(), batch)
    for name in ("energy", "forces"):
        assert_ulps(a[name], b[name], REORDERED_ULPS, what=name)


def test_conservative_s2ef_outputs_equal_fairchems_and_dens_batches_keep_the_energy(fixture_batch):
    ours, theirs = _pair("ours_conservative")
    a, b = _outputs(ours.eval(), fixture_batch), _outputs(theirs.eval(), fixture_batch)
    for name in ("energy", "forces", "stress"):
        assert_ulps(a[name], b[name], REORDERED_ULPS, what=name)
    corrupted = dens_mode_batch(fixture_batch, "partial")
    a, b = _outputs(ours, corrupted), _outputs(theirs, corrupted)
    assert torch.all(b["energy"] == 0)  # fairchem: energy * 0 in every DeNS batch
    assert torch.all(a["energy"].abs() > 0)
    noisy = corrupted.noise_mask
    assert_ulps(a["forces"][noisy], b["forces"][noisy], REORDERED_ULPS, what="noise")  # same noise head


def test_conservative_dens_trains_energy_clean_forces_and_stress_where_fairchem_gives_zero(fixture_batch):
    """A partial DeNS batch of per-structure selection: each loss term's gradient, ours vs fairchem's."""
    ours, theirs = _pair("ours_conservative")
    batch = corrupt_like_trainer(fixture_batch, seed=3, corrupt_ratio=0.5, prob=0.5, selection="structure")
    structures = corrupted_structures(batch)
    assert 0 < int(structures.sum()) < structures.numel()  # corrupted and clean structures
    clean_atoms = ~batch.noise_mask
    terms = {
        "energy": lambda out: out["energy"].pow(2).sum(),
        "clean-atom forces": lambda out: out["forces"][clean_atoms].pow(2).sum(),
        "stress of clean structures": lambda out: out["stress"][~structures].pow(2).sum(),
        "noise": lambda out: out["forces"][batch.noise_mask].pow(2).sum(),
    }
    for name, term in terms.items():
        norms = []
        for model in (ours, theirs):
            model.train().zero_grad()
            term(_outputs(model, batch)).backward()
            norms.append(sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None))
        assert norms[0] > 0, name
        if name == "noise":
            assert norms[1] == pytest.approx(norms[0], rel=GRADIENT_ULPS * EPS32)
        else:
            assert norms[1] == 0, name  # fairchem's head trains nothing but the noise in DeNS batches


def _trained_checkpoint(model: torch.nn.Module, with_ema: bool) -> dict:
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    checkpoint = {
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "config": {"model": esen_dens_model_config("ours"), "outputs": {"energy": {}, "forces": {}}},
        "normalizers": {
            "energy": {"mean": torch.tensor(-3.0), "rmsd": torch.tensor(2.5)},
            "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(0.7)},
            "denoising_pos_target": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(0.1)},
        },
        "epoch": 3,
        "step": 30,
        "optimizer": {},
        "ema": None,
    }
    if with_ema:
        ema = ExponentialMovingAverage([p for p in model.parameters() if p.requires_grad], 0.5)
        for shadow in ema.shadow_params:
            shadow.add_(0.01 * torch.randn_like(shadow))
        checkpoint["ema"] = ema.state_dict()
    return checkpoint


@pytest.mark.parametrize("with_ema", [False, True])
def test_to_conservative_keeps_the_energy_of_the_direct_model(fixture_batch, with_ema):
    direct = build_model(esen_dens_model_config("ours"), seed=0).eval()
    with torch.no_grad():
        direct.backbone.force_embedding.bias.normal_()
    checkpoint = _trained_checkpoint(direct, with_ema)
    converted = conservative_finetune_checkpoint(checkpoint)
    assert converted["epoch"] == 0 and converted["step"] == 0 and "optimizer" not in converted
    # the DeNS noise normaliser is dropped; -dE/dx and the virial come out in units of the energy rmsd
    normalizers = converted["normalizers"]
    assert set(normalizers) == {"energy", "forces", "stress"}
    assert normalizers["energy"]["mean"].item() == -3.0 and normalizers["energy"]["rmsd"].item() == 2.5
    for name in ("forces", "stress"):
        assert normalizers[name]["mean"].item() == 0.0 and normalizers[name]["rmsd"].item() == 2.5
    del checkpoint["normalizers"]["energy"]  # energy not normalised (element references only): units of 1
    for name in ("forces", "stress"):
        assert conservative_finetune_checkpoint(checkpoint)["normalizers"][name]["rmsd"].item() == 1.0
    plain = build_model(converted["config"]["model"]).eval()
    assert type(plain.backbone).__module__ == "fairchem.core.models.esen.esen"
    plain.load_state_dict(converted["state_dict"], strict=True)
    reference = direct
    if with_ema:  # the converted model is the EMA's, as fairchem evaluates a trained model
        reference = build_model(esen_dens_model_config("ours"), seed=0).eval()
        reference.load_state_dict(direct.state_dict())
        with torch.no_grad():
            trainable = [p for p in reference.parameters() if p.requires_grad]
            for parameter, shadow in zip(trainable, checkpoint["ema"]["shadow_params"]):
                parameter.copy_(shadow)
    with torch.no_grad():
        expected = reference(fixture_batch.clone())["energy"]
    assert_ulps(plain(fixture_batch.clone())["energy"], expected, REORDERED_ULPS, what="energy")


def test_to_conservative_refuses_other_backbones():
    from fairchem_dens.testing import eqv2_dens_model_config

    model = build_model(eqv2_dens_model_config("ours"))
    checkpoint = {"state_dict": model.state_dict(), "config": {"model": eqv2_dens_model_config("ours")}}
    with pytest.raises(CheckpointMismatchError, match="converts eSEN checkpoints.*EquiformerV2"):
        conservative_finetune_checkpoint(checkpoint)


def test_two_step_recipe_end_to_end(tmp_path, bulk_overrides):
    """Direct DeNS pre-training -> fairchem-dens to-conservative -> fairchem's conservative fine-tuning."""

    def fairchem(*args):
        result = subprocess.run(
            [*fairchem_command(), *args, "--cpu", "--run-dir", str(tmp_path), *bulk_overrides],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    fairchem(
        "--mode",
        "train",
        "--config-yml",
        str(QUICKSTART / "esen_dens_bulk_tiny.yml"),
        "--timestamp-id",
        "direct",
        "--optim.max_epochs=1",
    )
    direct = tmp_path / "checkpoints" / "direct" / "checkpoint.pt"
    start = tmp_path / "conservative_start.pt"
    result = subprocess.run(
        [sys.executable, "-m", "fairchem_dens.cli", "to-conservative", str(direct), str(start)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EMA weights" in result.stdout
    again = subprocess.run(
        [sys.executable, "-m", "fairchem_dens.cli", "to-conservative", str(direct), str(start)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "exists; pass --overwrite" in again.stderr
    log = fairchem(
        "--mode",
        "train",
        "--config-yml",
        str(QUICKSTART / "esen_conservative_bulk_tiny.yml"),
        "--timestamp-id",
        "conservative",
        "--checkpoint",
        str(start),
        "--optim.max_epochs=1",
        "--print-every",
        "1",
    )
    assert "stress_mae" in log and "denoising" not in log.split("Loading checkpoint")[-1]
    final = read_checkpoint(tmp_path / "checkpoints" / "conservative" / "checkpoint.pt")
    norms = final["normalizers"]  # the converted checkpoint's, loaded over the config's own fit
    assert norms["forces"]["rmsd"].item() == norms["stress"]["rmsd"].item() == norms["energy"]["rmsd"].item()
    assert not any("force_embedding" in k or "denoising" in k for k in strip_ddp_prefix(final["state_dict"]))
    assert final["step"] > 0 and final["config"]["model"]["heads"]["energy"]["module"].endswith("esen.MLP_EFS_Head")
