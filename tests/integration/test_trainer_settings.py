"""Every DeNS setting through the same trainer, for both backbones (EquiformerV2, eSCN)."""

from __future__ import annotations

import pytest
import torch

from fairchem_dens.models.dens_features import is_dens_batch
from fairchem_dens.testing import fairchem_trainer

from helpers import QUICKSTART, data_overrides

MODELS = {"eqv2": QUICKSTART / "eqv2_dens_tiny.yml", "escn": QUICKSTART / "escn_dens_tiny.yml"}
P = "--optim.denoising_pos_params."
SETTINGS = {
    "partial": [],
    "full": [f"{P}corrupt_ratio=None"],
    "multiscale": [f"{P}fixed_noise_std=False", f"{P}std_low=0.01", f"{P}std_high=0.2", f"{P}num_steps=10"],
    "per_structure": [f"{P}selection=structure", f"{P}prob=0.5"],
    "relaxation_only": [f"{P}relaxation_only=True"],
    "all_atoms": [f"{P}all_atoms=True", f"{P}corrupt_ratio=None"],
    "linear_decay": [f"{P}coefficient_schedule=linear_decay"],
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_setting_trains(emt_data, tmp_path, model, setting):
    overrides = [f"{P}prob=1.0", "--optim.batch_size=6", *SETTINGS[setting]]
    with fairchem_trainer(MODELS[model], tmp_path, *data_overrides(emt_data), *overrides) as ctx:
        trainer = ctx.trainer
        trainer.model.train()
        corrupted_any = False
        structure_states = set()
        for step, batch in zip(range(1, 4), trainer.train_loader):
            clean_pos = batch.pos.clone()
            trainer.step, trainer.epoch = step, 0.5
            out = trainer._forward(batch)  # training mode: corrupts
            loss = trainer._compute_loss(out, batch)
            assert torch.isfinite(loss)
            trainer.optimizer.zero_grad()
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)
            if not is_dens_batch(batch):
                continue
            corrupted_any = True
            moved = (batch.pos - clean_pos).norm(dim=-1) > 0
            fixed = batch.fixed == 1
            if setting == "all_atoms":
                assert moved[fixed].any()
            else:
                assert not moved[fixed].any()
            if setting == "relaxation_only":
                md_atoms = batch.md.bool()[batch.batch]
                assert not moved[md_atoms].any() and moved[~md_atoms].any()
            if setting == "per_structure":
                per_structure = torch.zeros(batch.natoms.numel()).index_add_(0, batch.batch, moved.float())
                structure_states.update((per_structure > 0).tolist())
            if setting == "multiscale":
                sigmas = batch.sigmas.view(-1)[moved]
                assert sigmas.min() >= 0.01 - 1e-6 and sigmas.max() <= 0.2 + 1e-6
        assert corrupted_any
        if setting == "per_structure":  # structures of one batch are chosen independently
            assert structure_states == {True, False}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_one_real_epoch(emt_data, tmp_path, model):
    with fairchem_trainer(
        MODELS[model],
        tmp_path,
        *data_overrides(emt_data),
        "--optim.max_epochs=1",
        "--optim.batch_size=8",
        "--optim.eval_every=2",
    ) as ctx:
        ctx.task.setup(ctx.trainer)
        ctx.task.run()
        assert ctx.trainer.step == len(ctx.trainer.train_loader)
        assert (tmp_path / "checkpoints" / "test" / "checkpoint.pt").exists()
        assert (tmp_path / "checkpoints" / "test" / "best_checkpoint.pt").exists()
