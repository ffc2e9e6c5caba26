"""Accuracy study on the built-in EMT data: does DeNS lower force errors, and why?

Trains the tiny EquiformerV2 of configs/quickstart/ through `fairchem --mode train` with and
without DeNS and two ablations, several seeds each, predicts held-out frames of seen
systems (`test`) and of an unseen adsorbate (`ood`), and prints energy / force MAE
(mean ± std over seeds) as a markdown table; writes the raw numbers to JSON and a plot.

    ./dens.sh run python benchmarks/accuracy.py --seeds 0 1 2 --epochs 20 --out accuracy_output
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fairchem_dens.datasets.emt_data import generate_emt_dataset
from fairchem_dens.quickstart import fairchem_command, prediction_errors, run_logged
from fairchem_dens.resources import configs_dir

P = "--optim.denoising_pos_params."
VARIANTS = {
    "EquiformerV2": ("quickstart/eqv2_tiny.yml", []),
    "+ DeNS": ("quickstart/eqv2_dens_tiny.yml", [f"{P}validate_denoising=False"]),
    "+ DeNS, no force encoding": (
        "quickstart/eqv2_dens_tiny.yml",
        [f"{P}validate_denoising=False", "--model.backbone.use_force_encoding=False"],
    ),
    "+ DeNS, multi-scale sigma": (
        "quickstart/eqv2_dens_tiny.yml",
        [
            f"{P}validate_denoising=False",
            f"{P}fixed_noise_std=False",
            f"{P}std_low=0.01",
            f"{P}std_high=0.1",
            f"{P}num_steps=10",
        ],
    ),
}


def train_and_score(name: str, seed: int, data: Path, out: Path, epochs: int) -> dict:
    config, extra = VARIANTS[name]
    run_dir = out / "runs" / f"{name.replace(' ', '_').replace(',', '').replace('+', 'plus')}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    common = [
        "--config-yml",
        str(configs_dir() / config),
        "--cpu",
        "--run-dir",
        str(run_dir),
        "--seed",
        str(seed),
        f"--dataset.train.src={data / 'train'}",
        f"--dataset.val.src={data / 'val'}",
        f"--optim.max_epochs={epochs}",
        *extra,
    ]
    seconds = run_logged(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--timestamp-id",
            "train",
            *common,
            f"--dataset.test.src={data / 'test'}",
        ],
        run_dir / "train.log",
        run_dir,
    )
    checkpoint = run_dir / "checkpoints" / "train" / "best_checkpoint.pt"
    scores = {"train_seconds": seconds}
    for split in ("test", "ood"):
        stamp = f"predict-{split}"
        run_logged(
            [
                *fairchem_command(),
                "--mode",
                "predict",
                "--timestamp-id",
                stamp,
                "--checkpoint",
                str(checkpoint),
                *common,
                f"--dataset.test.src={data / split}",
            ],
            run_dir / f"{stamp}.log",
            run_dir,
        )
        energy, force = prediction_errors(run_dir / "results" / stamp / "s2ef_predictions.npz", data / split)
        scores[f"{split}_energy_meV"], scores[f"{split}_force_meV_per_A"] = energy, force
    return scores


def summarise(results: dict[str, list[dict]]) -> str:
    keys = ["test_force_meV_per_A", "ood_force_meV_per_A", "test_energy_meV", "ood_energy_meV"]
    lines = [
        "| model | F MAE test (meV/Å) | F MAE ood (meV/Å) | E MAE test (meV) | E MAE ood (meV) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        cells = []
        for key in keys:
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(
        axes, ("test_force_meV_per_A", "ood_force_meV_per_A"), ("held-out frames", "unseen adsorbate")
    ):
        names = list(results)
        for x, name in enumerate(names):
            values = [r[key] for r in results[name]]
            ax.scatter([x] * len(values), values, alpha=0.7)
            ax.errorbar(
                [x],
                [statistics.mean(values)],
                yerr=[statistics.stdev(values) if len(values) > 1 else 0],
                fmt="_",
                color="black",
                capsize=6,
            )
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel("force MAE (meV/Å)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--systems", type=int, default=48)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", default="accuracy_output")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "train" / "data.lmdb").exists():
        generate_emt_dataset(data, n_systems=args.systems, seed=0, holdout_adsorbate="OH")
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seeds outermost: a partial run still compares every variant
        for name in args.variants:
            scores = train_and_score(name, seed, data, out, args.epochs)
            results.setdefault(name, []).append({"seed": seed, **scores})
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()), flush=True)
            (out / "accuracy.json").write_text(json.dumps(results, indent=2))
    print(summarise(results))
    plot(results, out / "accuracy.png")


if __name__ == "__main__":
    main()
