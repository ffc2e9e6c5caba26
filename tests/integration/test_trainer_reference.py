"""Our trainer's losses and metrics equal the original trainer's on its own reference batches.

`tests/data/original_dens/<model>/trainer_reference.json` holds the original
`DenoisingForcesTrainer._compute_loss` / `_compute_metrics` values for the
S2EF, full- and partial-corruption batches of `reference_outputs.npz`, computed
with the raw weights of `checkpoint.pt` in eval mode after `torch.manual_seed(7)`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fairchem_dens.testing import fairchem_trainer
from fairchem_dens.testing.tolerances import F32_STORAGE_REL, TRAINER_REFERENCE_ULPS, assert_ulps

from helpers import ORIGINAL, config_for, fixture_case, fixture_lmdb

STD = {"eqv2_dens": 0.1, "escn_dens": 0.15}  # optim.denoising_pos_params.std of each fixture run
CASES = ("s2ef", "dens_full", "dens_partial")


def reference_trainer_config(name, tmp_path):
    folder, _ = fixture_lmdb(tmp_path / "data")
    path = config_for(name, folder, tmp_path / "config.yml")
    config = yaml.safe_load(path.read_text())
    train_config = yaml.safe_load((ORIGINAL / name / "train_config.yml").read_text())
    config["dataset"]["train"] = {
        "format": "lmdb",
        "src": str(folder / "val"),
        "transforms": {
            "normalizer": {
                "energy": {"mean": -0.7554450631141663, "rmsd": 2.887317180633545},
                "forces": {"mean": 0.0, "rmsd": 2.887317180633545},
            }
        },
    }
    config["dataset"]["val"]["src"] = str(folder / "test")
    del config["dataset"]["test"]
    config["evaluation_metrics"] = train_config["evaluation_metrics"]
    config["optim"]["denoising_pos_params"]["std"] = STD[name]
    config["optim"]["scheduler_params"]["warmup_epochs"] = 1  # one step: 4 structures, batch 4
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ["eqv2_dens", "escn_dens"])
def test_losses_and_metrics_equal_the_original_trainer(tmp_path, name):
    expected = json.loads((ORIGINAL / name / "trainer_reference.json").read_text())
    ref = np.load(ORIGINAL / name / "reference_outputs.npz")
    with fairchem_trainer(reference_trainer_config(name, tmp_path), tmp_path / "run") as ctx:
        trainer = ctx.trainer
        trainer.load_checkpoint(str(ORIGINAL / name / "checkpoint.pt"))  # raw weights in the model
        trainer.model.eval()
        assert trainer.normalizers["denoising_pos_target"].rmsd.item() == pytest.approx(STD[name], rel=F32_STORAGE_REL)
        for case in CASES:
            batch = fixture_case(ref, case)
            if case != "s2ef":
                batch.noise_vec = torch.tensor(ref[f"{case}_noise_vec"])
                batch.denoising_target = batch.noise_vec / STD[name]
            torch.manual_seed(int(ref["forward_seed"]))
            with torch.no_grad():
                out = trainer._forward(batch)
                loss = trainer._compute_loss(out, batch)
                metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
            key = "s2ef" if case == "s2ef" else case
            assert_ulps(loss.item(), expected["loss"][key], TRAINER_REFERENCE_ULPS, what=f"{case} loss")
            assert set(metrics) == set(expected["metrics"][key]), case
            for metric, value in expected["metrics"][key].items():
                assert_ulps(metrics[metric]["metric"], value, TRAINER_REFERENCE_ULPS, what=f"{case} {metric}")
