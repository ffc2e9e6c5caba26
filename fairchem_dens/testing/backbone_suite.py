"""The tests every DeNS backbone adapter passes (one subclass per backbone, NequIP-style mixins).

A backbone's test module subclasses :class:`BackboneSuite` as ``Test<Name>`` and fills
in the class attributes and hooks below; pytest collects the inherited tests for it. The
tests take a ``fixture_batch`` fixture: a PyG batch with ``forces``, ``fixed`` and a cell
(this repository's tests/conftest.py builds it with :func:`fairchem_dens.testing.batch_from_tensors`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fairchem_dens.models.checkpoints import checkpoint_family, read_checkpoint, strip_ddp_prefix
from fairchem_dens.quickstart import fairchem_command
from fairchem_dens.testing.batches import dens_mode_batch, rotate_batch, rotation_matrix
from fairchem_dens.testing.models import build_model, forward_seeded
from fairchem_dens.testing.tolerances import GRADIENT_ULPS, REORDERED_ULPS, assert_ulps

MODES = ("s2ef", "full", "partial")


class BackboneSuite:
    """Shared tests of a DeNS backbone and its heads.

    Subclasses set:
        family: the adapter's family key.
        noise_block / force_block: ``(head name, attribute)`` of the noise and force blocks.
        force_block_in_full: whether a fully corrupted batch runs the force block too
            (a conservative head's energy block always runs).
        rotation_tolerance: allowed ``|R F - F(R x)| / |F|`` and ``|E - E(R x)| / max |E|`` (S2
            grids and sphere samples make some backbones only approximately equivariant;
            :mod:`fairchem_dens.testing.tolerances`).
        cli_config: the shipped config of the CLI train -> predict test.
    and define ``model_config(flavour, backbone=None, **dens)``, ``rotation_backbone()``,
    ``plain_state_dict(ours)`` (our weights for fairchem's plain model, DeNS parts
    removed and the encoding bias folded in) and ``cli_data(request)`` (CLI overrides).
    """

    family: ClassVar[str]
    noise_block: ClassVar[tuple[str, str]]
    force_block: ClassVar[tuple[str, str]]
    force_block_in_full: ClassVar[bool] = False
    rotation_tolerance: ClassVar[float]
    cli_config: ClassVar[Path]
    outputs: ClassVar[tuple[str, ...]] = ("energy", "forces")

    # ------------------------------------------------------------------ hooks

    def model_config(self, flavour: str = "ours", backbone: dict | None = None, **dens: Any) -> dict:
        raise NotImplementedError

    def rotation_backbone(self) -> dict | None:
        return None

    def plain_state_dict(self, ours: torch.nn.Module) -> dict:
        raise NotImplementedError

    def cli_data(self, request) -> list[str]:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def model(self, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
        model = build_model(self.model_config(**kwargs), seed=seed)
        with torch.no_grad():  # non-zero encoding weights and bias, so they matter
            model.backbone.force_embedding.weight.normal_()
            model.backbone.force_embedding.bias.normal_()
        return model

    @staticmethod
    def block(model: torch.nn.Module, where: tuple[str, str]) -> torch.nn.Module:
        return getattr(model.output_heads[where[0]], where[1])

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(out[name].pow(2).sum() for name in self.outputs)

    # ------------------------------------------------------------------ tests

    def test_denoising_off_equals_plain_fairchem_model(self, fixture_batch):
        ours = self.model().eval()
        plain = build_model(self.model_config("plain"), seed=3).eval()
        plain.load_state_dict(self.plain_state_dict(ours), strict=True)
        with torch.enable_grad():
            a, b = forward_seeded(ours, fixture_batch), forward_seeded(plain, fixture_batch)
        for name in self.outputs:  # a conservative head's forces and stress are gradients
            assert_ulps(a[name], b[name], REORDERED_ULPS if name == "energy" else GRADIENT_ULPS, what=name)

    def test_inference_and_s2ef_never_run_the_noise_block(self, fixture_batch):
        model = self.model()
        calls = {"noise": 0, "force": 0}
        self.block(model, self.noise_block).register_forward_hook(
            lambda *a: calls.__setitem__("noise", calls["noise"] + 1)
        )
        self.block(model, self.force_block).register_forward_hook(
            lambda *a: calls.__setitem__("force", calls["force"] + 1)
        )
        expected = {"s2ef": (1, 0), "full": (int(self.force_block_in_full), 1), "partial": (1, 1)}
        for mode, (force_calls, noise_calls) in expected.items():
            outputs = []
            for training in (True, False):
                calls.update(noise=0, force=0)
                outputs.append(forward_seeded(model.train(training), dens_mode_batch(fixture_batch, mode)))
                assert (calls["force"], calls["noise"]) == (force_calls, noise_calls), (mode, training)
            for name in self.outputs:  # no dropout in the tiny models: training computes what inference does
                assert_ulps(outputs[0][name], outputs[1][name], REORDERED_ULPS, what=f"{mode} {name}")

    def test_no_tensor_of_a_batch_stays_on_the_model_so_it_deep_copies_after_a_forward(self, fixture_batch):
        import copy

        model = self.model().train()
        for mode in MODES:  # what an EMA copy or a checkpoint of a model in training does
            self.loss(forward_seeded(model, dens_mode_batch(fixture_batch, mode))).backward()
            copy.deepcopy(model)

    def test_every_parameter_gets_a_gradient_in_every_batch_kind(self, fixture_batch):
        model = self.model().train()
        for mode in MODES:
            model.zero_grad()
            self.loss(forward_seeded(model, dens_mode_batch(fixture_batch, mode))).backward()
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, (mode, missing[:5])  # DDP without find_unused_parameters needs them all
            unused = (
                {"s2ef": self.noise_block, "full": None if self.force_block_in_full else self.force_block}[mode]
                if mode != "partial"
                else None
            )
            if unused:  # a block that did not run gets an exact zero
                assert all(torch.all(p.grad == 0) for p in self.block(model, unused).parameters()), mode

    def test_rotation_equivariance_with_encoded_forces_rotated(self, fixture_batch):
        model = self.model(backbone=self.rotation_backbone()).eval()
        rotation = rotation_matrix(5)
        for mode in MODES:
            batch = dens_mode_batch(fixture_batch, mode)
            out = forward_seeded(model, batch, seed=7)
            out_rot = forward_seeded(model, rotate_batch(batch, rotation), seed=11)
            energy = out["energy"]
            # the energy integrates over the same grids and samples as the forces
            assert (energy - out_rot["energy"]).abs().max() <= self.rotation_tolerance * energy.abs().max(), mode
            expected = out["forces"] @ rotation.T
            relative = float((expected - out_rot["forces"]).norm() / expected.norm())
            assert relative <= self.rotation_tolerance, (mode, relative)
            if mode != "s2ef":  # positions rotated but the encoded forces not: clearly worse
                wrong = rotate_batch(batch, rotation)
                wrong.forces = batch.forces
                out_wrong = forward_seeded(model, wrong, seed=11)
                assert float((expected - out_wrong["forces"]).norm() / expected.norm()) > 5 * relative, mode

    def test_cli_train_predict_and_checkpoint_round_trip(self, request, tmp_path):
        common = ["--config-yml", str(self.cli_config), "--cpu", "--run-dir", str(tmp_path), *self.cli_data(request)]
        train = [
            *fairchem_command(),
            "--mode",
            "train",
            "--timestamp-id",
            "t",
            "--print-every",
            "1",
            "--optim.max_epochs=1",
            "--optim.denoising_pos_params.prob=0.5",
            *common,
        ]
        result = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "denoising_pos_mae" in result.stdout + result.stderr
        path = tmp_path / "checkpoints" / "t" / "checkpoint.pt"
        checkpoint = read_checkpoint(path)
        assert checkpoint_family(checkpoint) == ("hydra", self.family)
        rebuilt = build_model(checkpoint["config"]["model"])
        rebuilt.load_state_dict(strip_ddp_prefix(checkpoint["state_dict"]), strict=True)
        predict = [*fairchem_command(), "--mode", "predict", "--timestamp-id", "p", "--checkpoint", str(path), *common]
        result = subprocess.run(predict, capture_output=True, text=True, cwd=tmp_path, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        with np.load(tmp_path / "results" / "p" / "s2ef_predictions.npz") as predictions:
            assert len(predictions["ids"]) > 0
            assert np.isfinite(predictions["energy"]).all()
            assert all(np.isfinite(f).all() for f in predictions["forces"])


class BlockNoiseHeadSuite:
    """What a ``noise_head: block`` head adds to :class:`BackboneSuite` (mix it in before the suite).

    The block must give the corrupted atoms what it gives them on the whole graph, while running on
    their incoming edges only. Subclasses define ``backbone_embeddings(model, batch)`` (the backbone's
    ``emb`` dict) besides the suite's hooks.
    """

    def backbone_embeddings(self, model: torch.nn.Module, batch) -> dict:
        return model.backbone(batch)

    def test_block_noise_head_on_the_corrupted_atoms_equals_the_block_on_every_atom(self, fixture_batch):
        model = self.model().eval()
        batch = dens_mode_batch(fixture_batch, "partial")
        noisy = batch.noise_mask.view(-1).bool()
        assert 0 < int(noisy.sum()) < noisy.numel()
        block = self.block(model, self.noise_block)
        seen = []
        block.block.register_forward_hook(lambda module, args, out: seen.append((args[0].shape[0], args[3].shape[1])))
        torch.manual_seed(3)
        with torch.enable_grad():  # gradient-force backbones need grad on the positions
            emb = self.backbone_embeddings(model, batch.clone())
            everywhere = block(batch, emb, torch.ones_like(noisy))[noisy]
            corrupted_only = block(batch, emb, noisy)
        # the same edges and nodes in another order and other edge frames about each edge's
        # axis (SO(2) convolutions do not depend on them): rounding only
        assert_ulps(corrupted_only, everywhere, GRADIENT_ULPS, what="noise of corrupted atoms")
        edge_index = emb["edge_index"]
        incoming = int(noisy[edge_index[1]].sum())
        nodes = noisy.clone()
        nodes[edge_index[0, noisy[edge_index[1]]]] = True
        assert seen[-1] == (int(nodes.sum()), incoming)  # the subgraph, not the batch
        assert seen[0] == (noisy.numel(), edge_index.shape[1])
        # negative control: a message-passing block reads the clean neighbours too (a per-atom
        # head would pass the checks above); moving one's features moves the noise
        neighbour = int(edge_index[0, noisy[edge_index[1]] & ~noisy[edge_index[0]]][0])
        moved = dict(emb, node_embedding=emb["node_embedding"].clone())
        moved["node_embedding"][neighbour] += 1.0
        with torch.enable_grad():
            assert not torch.allclose(block(batch, moved, noisy), corrupted_only)
