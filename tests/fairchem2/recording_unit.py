"""A DeNSTrainEvalUnit that records, per step, what the model saw and what core.corrupt_batch gives.

Loaded by the CLI runs of test_cli.py through ``runner.train_eval_unit._target_`` (the test
puts this folder on PYTHONPATH). Each rank writes ``<record_dir>/rank<r>.json`` at the end.
"""

from __future__ import annotations

import json
import os

import torch
from fairchem.core.common import distutils

from fairchem_dens.core.batch import corrupt_batch, corrupted_atoms, is_dens_batch
from fairchem_dens.fairchem2.unit import DeNSTrainEvalUnit


def _innermost(module):
    while hasattr(module, "module"):
        module = module.module
    return module


class RecordingUnit(DeNSTrainEvalUnit):
    def __init__(self, *args, record_dir: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_dir = record_dir
        self.records = {"train": [], "eval": []}
        self._seen = None
        # on the HydraModel inside DDP (and inside the EMA copy): fairchem calls DDP's .forward
        _innermost(self.model).register_forward_pre_hook(self._see_train)
        _innermost(self.eval_unit.model).register_forward_pre_hook(self._see_eval)

    def _see_train(self, module, args):
        data = args[0]
        self._seen = {"pos": data.pos.detach().clone(), "dens": is_dens_batch(data)}

    def _see_eval(self, module, args):
        data = args[0]
        self.records["eval"].append({"dens": is_dens_batch(data), "noise_vec": "noise_vec" in data})

    def train_step(self, state, data):
        step = self.train_progress.num_steps_completed
        # The corruption the core draws for this step, on an independent copy of the clean batch.
        expected = data.clone()
        expected_dens = False
        if self.dens.active_in_epoch(self.train_progress.num_epochs_completed):
            expected_dens = corrupt_batch(
                self.dens, expected, seed=self.job_config.seed, step=step, rank=distutils.get_rank()
            )
        super().train_step(state, data)
        self.records["train"].append(
            {
                "step": step,
                "dens": self._seen["dens"],
                "expected_dens": expected_dens,
                "pos_equal": torch.equal(self._seen["pos"], expected.pos),
                "corrupted_atoms": int(corrupted_atoms(expected).sum()) if expected_dens else 0,
                "atoms": int(expected.pos.shape[0]),
                "loss": float(self.last_loss),
                "epoch": self.train_progress.num_epochs_completed,
                "steps_in_epoch": len(state.train_state.dataloader),
                "coefficient": float(self.dens_step.denoising_coefficient),
                # per structure: the largest |F_i| of its labels, and whether the core corrupted it
                "max_force": [
                    float(expected.forces[expected.batch == b].norm(dim=1).max())
                    for b in range(int(expected.natoms.numel()))
                ],
                "corrupted": [
                    bool(corrupted_atoms(expected)[expected.batch == b].any()) if expected_dens else False
                    for b in range(int(expected.natoms.numel()))
                ],
                "md": expected["md"].tolist() if "md" in expected.keys() else None,
            }
        )

    def on_train_end(self, state):
        super().on_train_end(state)
        os.makedirs(self.record_dir, exist_ok=True)
        with open(os.path.join(self.record_dir, f"rank{distutils.get_rank()}.json"), "w") as f:
            json.dump(self.records, f)
