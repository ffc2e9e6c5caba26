"""Why does (or doesn't) DeNS help? Magnitudes and gradients of a trained MD17-study model.

Loads a checkpoint of ``benchmarks/md17_study.py``, corrupts training batches with the
trainer's own code (the recipe's sigma and corrupt ratio, every structure selected)
and reports:

* denoising error (Å per component) of the noise head with the true force encoding,
  with the encoding switched off, and with the forces of another frame encoded,
  against the zero predictor's sigma*sqrt(2/pi): does the model use the encoding?
* the size of the force encoding's contribution to the node embeddings of corrupted
  atoms against the atomic-number embedding;
* gradient norms of the force term (clean atoms) and the denoising term (corrupted
  atoms) with respect to the backbone, and the cosine between them.

    ./dens.sh run python benchmarks/dens_diagnostics.py CHECKPOINT [--batches 12]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from fairchem_dens.core.batch import corrupted_atoms
from fairchem_dens.resources import configs_dir
from fairchem_dens.testing import corrupt_like_trainer, fairchem_trainer

RECIPE = "md17/xtb_small_data.yml"


def _l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(pred - target, dim=-1).mean()


def diagnose(trainer, batches: int, sigma: float, corrupt_ratio: float, seed: int = 0) -> dict:
    model = getattr(trainer.model, "module", trainer.model)  # fairchem wraps it in DDP even on one CPU
    backbone = model.backbone
    model.eval()  # no dropout in the recipe; eval keeps EquiformerV2 deterministic per seed
    force_norm = trainer.normalizers["forces"]
    coef_f = next(info["coefficient"] for name, info in trainer.loss_functions if name == "forces")
    coef_d = trainer.dens.coefficient
    params = [p for p in backbone.parameters() if p.requires_grad]
    sums = {
        "denoise_true": 0.0,
        "denoise_no_encoding": 0.0,
        "denoise_other_frame": 0.0,
        "clean_force_mae_in_dens_batch": 0.0,
        "encoding_norm": 0.0,
        "atom_embedding_norm": 0.0,
        "grad_force": 0.0,
        "grad_denoise": 0.0,
        "grad_cosine": 0.0,
    }
    loader = iter(trainer.train_loader)
    for step in range(batches):
        batch = corrupt_like_trainer(
            next(loader), seed=seed, step=step + 1, std=sigma, corrupt_ratio=corrupt_ratio, selection="structure"
        )
        corrupted = corrupted_atoms(batch)
        noise = batch.noise_vec[corrupted]
        with torch.no_grad():
            for key, edit in (("denoise_true", None), ("denoise_no_encoding", "off"), ("denoise_other_frame", "roll")):
                trial = batch.clone()
                saved = backbone.use_force_encoding
                if edit == "off":
                    backbone.use_force_encoding = False
                elif edit == "roll":  # forces of the neighbouring frame (MD17: one molecule, same atoms)
                    trial.forces = trial.forces.view(trial.natoms.numel(), -1, 3).roll(1, dims=0).reshape(-1, 3)
                torch.manual_seed(0)
                out = model(trial)["forces"]
                backbone.use_force_encoding = saved
                sums[key] += (
                    (out[corrupted] * trainer.normalizers["denoising_pos_target"].rmsd - noise).abs().mean().item()
                )
                if key == "denoise_true":
                    clean = ~corrupted
                    sums["clean_force_mae_in_dens_batch"] += (
                        (force_norm.denorm(out[clean]) - batch.forces[clean]).abs().mean().item()
                    )
            with_fe = backbone.dens_node_features(batch)[corrupted]
            backbone.use_force_encoding = False
            bias_only = backbone.dens_node_features(batch)[corrupted]
            backbone.use_force_encoding = True
            sums["encoding_norm"] += torch.linalg.vector_norm(with_fe - bias_only, dim=(1, 2)).mean().item()
            sums["atom_embedding_norm"] += (
                torch.linalg.vector_norm(backbone.sphere_embedding(batch.atomic_numbers.long()[corrupted]), dim=-1)
                .mean()
                .item()
            )
        torch.manual_seed(0)
        out = model(batch)["forces"]
        loss_f = coef_f * _l2(out[~corrupted], force_norm.norm(batch.forces[~corrupted]))
        loss_d = coef_d * _l2(out[corrupted], batch.denoising_target[corrupted])
        g_f = torch.autograd.grad(loss_f, params, retain_graph=True, allow_unused=True)
        g_d = torch.autograd.grad(loss_d, params, allow_unused=True)
        flat_f = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_f, params)])
        flat_d = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_d, params)])
        sums["grad_force"] += flat_f.norm().item()
        sums["grad_denoise"] += flat_d.norm().item()
        sums["grad_cosine"] += torch.nn.functional.cosine_similarity(flat_f, flat_d, dim=0).item()
    result = {key: value / batches for key, value in sums.items()}
    result["denoise_zero_predictor"] = sigma * math.sqrt(2 / math.pi)
    result["lambda_F"], result["lambda_D_start"] = coef_f, coef_d
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="/work/study/data/ethanol")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--corrupt-ratio", type=float, default=0.25)
    parser.add_argument("--out", default=None, help="JSON file for the numbers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data)
    with (
        tempfile.TemporaryDirectory() as run_dir,
        fairchem_trainer(
            configs_dir() / RECIPE,
            run_dir,
            f"--dataset.train.src={data / 'train'}",
            f"--dataset.train.first_n={args.n_train}",
            f"--dataset.val.src={data / 'val'}",
            "--dataset.val.first_n=50",
            f"--dataset.test.src={data / 'test'}",
            "--dataset.test.first_n=8",
        ) as ctx,
    ):
        ctx.trainer.load_checkpoint(args.checkpoint)
        result = diagnose(ctx.trainer, args.batches, args.sigma, args.corrupt_ratio)
    result["checkpoint"] = args.checkpoint
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
