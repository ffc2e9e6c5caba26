"""Learning curves of DeNS in the paper's MD17 regime: conservative eSEN, block noise head, 950 frames.

Superseded by dens_regime_study.py (the force encoding at the original's strength, frames 100 fs
apart, the paper's schedule); kept to re-run the tables of BENCHMARKS.md "The paper's MD17 regime",
which ran on benchmarks/data/ethanol_5fs.npz with the encoding in eV/Å (`--model.backbone.force_encoding_scale=1`).

Trains ``configs/md17/esen/paper_md17_conservative.yml`` (the MD17 DeNS settings, a
conservative eSEN whose noise head is a whole message-passing block) through ``fairchem
--mode train`` with DeNS and without (``--optim.use_denoising_pos=False``, the same model and
trainer), on all 950 training frames of ``md17-to-lmdb`` folders. One run per seed and
variant; ``optim.keep_checkpoint_epochs`` keeps the weights after each epoch of ``--curve``,
and each of those checkpoints predicts the test split (and, for plain runs, the training
split: the test / train ratio says whether the model overfits). The warm-up is a tenth of
the run (the paper: 10 of 1500 epochs). The ablations (``--plan ablation``) train the
block-vs-linear noise head and sigma 0.025 against 0.05, each a run of ``--ablation-epochs``
beside a DeNS run of the same length (the same schedule).

Resumable: a run writes ``<results>/runs/<key>.json`` when done and is skipped when it
exists; its checkpoints and logs go to ``--work`` (outside the repository). ``--jobs``
runs at a time, one thread each.

    fairchem-dens make-xtb-md17 malonaldehyde malonaldehyde.npz --frames 1500
    fairchem-dens md17-to-lmdb malonaldehyde.npz DATA/malonaldehyde    # and ethanol: examples/
    ./dens.sh run python benchmarks/paper_regime_study.py --data DATA --plan curve ablation
    ./dens.sh run python benchmarks/paper_regime_study.py --data DATA --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dens_regime_study import mean_std, scoring_copy  # this folder is on sys.path

from fairchem_dens.quickstart import (
    BATCH_SIZE,
    fairchem_command,
    null_model_errors,
    parse_curves,
    prediction_errors,
    run_logged,
    split_frames,
    warmup_override,
)
from fairchem_dens.resources import configs_dir

RECIPE = configs_dir() / "md17" / "esen" / "paper_md17_conservative.yml"
P = "--optim.denoising_pos_params."
#: variant -> fairchem overrides of the recipe (which is DeNS with the block noise head, sigma 0.05 Å)
VARIANTS = {
    "plain": ["--optim.use_denoising_pos=False"],
    "dens": [],
    "dens_linear": ["--model.heads.energy.noise_head=linear"],
    "dens_std0.025": [f"{P}std=0.025"],
}
#: plan part -> variants; the ablation trains its own DeNS (block, sigma 0.05) comparator at its length
#: (plain at that length is what the quickstart trains)
PLANS = {"curve": ["plain", "dens"], "ablation": ["dens", "dens_linear", "dens_std0.025"]}
#: the run each variant's same-seed ratio divides by
COMPARATOR = {"dens": "plain", "dens_linear": "dens", "dens_std0.025": "dens"}
#: the published per-molecule loss weights (w_E, w_F) where they differ from the recipe's ethanol 1 / 80
WEIGHTS = {"malonaldehyde": (1, 100), "naphthalene": (2, 20), "uracil": (1, 20)}


@dataclass(frozen=True)
class Run:
    molecule: str
    variant: str
    seed: int
    epochs: int

    @property
    def key(self) -> str:
        return f"{self.molecule}-{self.variant}-e{self.epochs}-seed{self.seed}"


def molecule_overrides(molecule: str) -> list[str]:
    """The recipe's loss with the molecule's published weights (fairchem's overrides cannot index a list)."""
    w_e, w_f = WEIGHTS.get(molecule, (1, 80))
    return [
        f"--loss_functions=[{{'energy': {{'fn': 'mae', 'coefficient': {w_e}}}}}, "
        f"{{'forces': {{'fn': 'l2mae', 'coefficient': {w_f}}}}}]"
    ]


def train_run(run: Run, data: Path, work: Path, curve: list[int]) -> dict:
    """Trains one run, then predicts test (and, plain, train) with each kept checkpoint."""
    folder = work / run.key
    folder.mkdir(parents=True, exist_ok=True)
    n_train = split_frames(data / "train")
    per_epoch = -(-n_train // BATCH_SIZE)
    common = [
        "--config-yml",
        str(RECIPE),
        "--cpu",
        "--run-dir",
        str(folder),
        "--seed",
        str(run.seed),
        f"--optim.max_epochs={run.epochs}",
        f"--dataset.train.src={data / 'train'}",
        f"--dataset.val.src={data / 'val'}",
        f"--dataset.val.first_n={split_frames(data / 'val')}",
        *molecule_overrides(run.molecule),
        *VARIANTS[run.variant],
        "--model.backbone.force_encoding_scale=1.0",
    ]  # as measured: eV/Å encoded (before 2026-12-08)
    kept = sorted({e for e in curve if e <= run.epochs} | {run.epochs})
    checkpoints = folder / "checkpoints" / "train"
    seconds = None
    if not all((checkpoints / f"checkpoint_epoch_{e}.pt").exists() for e in kept):
        seconds = run_logged(
            [
                *fairchem_command(),
                "--mode",
                "train",
                "--timestamp-id",
                "train",
                *common,
                *warmup_override(run.epochs),
                f"--optim.eval_every={per_epoch}",
                f"--optim.checkpoint_every={per_epoch}",
                f"--print-every={per_epoch}",
                f"--optim.keep_checkpoint_epochs=[{','.join(map(str, kept))}]",
                f"--dataset.test.src={data / 'test'}",
                "--dataset.test.first_n=8",
            ],
            folder / "train.log",
            folder,
            threads=1,
        )
    points = []
    splits = ("test", "train") if run.variant == "plain" else ("test",)
    # the training frames are scored from a copy (dens_regime_study.scoring_copy says why)
    scored = {"test": data / "test", "train": scoring_copy(data, work) if run.variant == "plain" else None}
    for epoch in kept:
        point = {"epoch": epoch}
        for split in splits:
            tag = f"e{epoch}_{split}"
            predictions = folder / "results" / tag / "s2ef_predictions.npz"
            if not predictions.exists():
                run_logged(
                    [
                        *fairchem_command(),
                        "--mode",
                        "predict",
                        "--timestamp-id",
                        tag,
                        "--checkpoint",
                        str(checkpoints / f"checkpoint_epoch_{epoch}.pt"),
                        *common,
                        f"--dataset.test.src={scored[split]}",
                        f"--dataset.test.first_n={split_frames(scored[split])}",
                    ],
                    folder / f"predict_{tag}.log",
                    folder,
                    threads=1,
                )
            energy, force = prediction_errors(predictions, data / split)
            point[f"{split}_energy_meV"], point[f"{split}_force_meV_per_A"] = energy, force
        points.append(point)
    curves = parse_curves(folder / "train.log")
    return {"run": run.__dict__, "train_seconds": seconds, "curve": points, **curves}


def epochs_to_reach(val_curve: list[list[float]], target: float) -> float | None:
    """First epoch whose validation force MAE is at or below ``target``, or None."""
    return next((epoch for epoch, value in val_curve if value <= target), None)


def report(results: Path, data_root: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    by = {(r["run"]["molecule"], r["run"]["variant"], r["run"]["epochs"], r["run"]["seed"]): r for r in runs}
    lines = []
    for molecule in sorted({r["run"]["molecule"] for r in runs}):
        null = null_model_errors(data_root / molecule)
        lines += [
            f"### {molecule}",
            "",
            f"Test split: mean predictor {null['energy_meV']:.1f} meV, "
            f"mean |F| component {null['force_meV_per_A']:.1f} meV/Å (the zero predictor's force MAE).",
            "",
            "| variant | run epochs | at epoch | test F MAE (meV/Å) | test E MAE (meV) | F ratio to its comparator, same seed | "
            "F ratio of means | E ratio of means | plain test / train F | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        keys = sorted(
            {(v, e) for (m, v, e, _) in by if m == molecule}, key=lambda k: (k[1], list(VARIANTS).index(k[0]))
        )
        for variant, run_epochs in keys:
            seeds = sorted(s for (m, v, e, s) in by if (m, v, e) == (molecule, variant, run_epochs))
            epochs = sorted({p["epoch"] for s in seeds for p in by[(molecule, variant, run_epochs, s)]["curve"]})
            for epoch in epochs:

                def at(v: str, s: int) -> dict | None:
                    run = by.get((molecule, v, run_epochs, s))
                    return next((p for p in run["curve"] if p["epoch"] == epoch), None) if run else None

                points = [at(variant, s) for s in seeds]
                force = [p["test_force_meV_per_A"] for p in points if p]
                energy = [p["test_energy_meV"] for p in points if p]
                other = COMPARATOR.get(variant)
                pairs = [
                    (at(variant, s)["test_force_meV_per_A"], at(other, s)["test_force_meV_per_A"])
                    for s in seeds
                    if other and at(variant, s) and at(other, s)
                ]
                energy_pairs = [
                    (at(variant, s)["test_energy_meV"], at(other, s)["test_energy_meV"])
                    for s in seeds
                    if other and at(variant, s) and at(other, s)
                ]
                energy_ratio = (
                    f"{statistics.mean(a for a, _ in energy_pairs) / statistics.mean(b for _, b in energy_pairs):.2f}"
                    if energy_pairs
                    else "–"
                )
                ratios = [a / b for a, b in pairs]
                ratio_text = f"{min(ratios):.3f}–{max(ratios):.3f}" if ratios and variant != "plain" else "–"
                mean_ratio = (
                    f"{statistics.mean(a for a, _ in pairs) / statistics.mean(b for _, b in pairs):.3f}"
                    if pairs and variant != "plain"
                    else "–"
                )
                overfit = [
                    p["test_force_meV_per_A"] / p["train_force_meV_per_A"]
                    for p in points
                    if p and "train_force_meV_per_A" in p
                ]
                lines.append(
                    f"| {variant} | {run_epochs} | {epoch} | {mean_std(force)} | {mean_std(energy)} | {ratio_text} | "
                    f"{mean_ratio} | {energy_ratio} | {mean_std(overfit, 2) if overfit else '–'} | {len(force)} |"
                )
        # the paper's training-efficiency claim: epochs to reach plain's best validation force MAE
        reach = []
        for (m, v, e, s), run in sorted(by.items()):
            if m != molecule or v != "dens" or (m, "plain", e, s) not in by:
                continue
            plain_best = min(value for _, value in by[(m, "plain", e, s)]["val_force"])
            plain_epoch = epochs_to_reach(by[(m, "plain", e, s)]["val_force"], plain_best)
            reached = epochs_to_reach(run["val_force"], plain_best)
            reach.append(
                f"{v} seed {s}: {reached if reached is not None else f'not within {e}'} "
                f"(plain: {plain_epoch:.0f}, best val {plain_best:.1f} meV/Å)"
            )
        if reach:
            lines += ["", "Epochs to reach plain's best validation force MAE: " + "; ".join(reach) + "."]
        lines.append("")
    text = "\n".join(lines)
    (results / "README.md").write_text("# Paper-regime learning curves (benchmarks/paper_regime_study.py)\n\n" + text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of md17-to-lmdb outputs, one per molecule")
    parser.add_argument("--molecules", nargs="+", default=["ethanol", "malonaldehyde"])
    parser.add_argument("--work", default="/work/study/paper_regime", help="run folders (checkpoints, logs)")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "paper_regime_study"))
    parser.add_argument("--plan", nargs="*", default=[], help=f"parts to run: {', '.join(PLANS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=25, help="length of every run")
    parser.add_argument("--curve", type=int, nargs="+", default=[5, 10, 15, 20, 25], help="epochs read along each run")
    parser.add_argument("--ablation-molecules", nargs="+", default=["ethanol"])
    parser.add_argument("--ablation-epochs", type=int, default=10)
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only write the tables")
    args = parser.parse_args()
    results, work, data = Path(args.results).resolve(), Path(args.work).resolve(), Path(args.data).resolve()
    (results / "runs").mkdir(parents=True, exist_ok=True)
    curve = [Run(m, v, s, args.epochs) for s in args.seeds for m in args.molecules for v in PLANS["curve"]]
    ablation = [
        Run(m, v, s, args.ablation_epochs)
        for s in args.ablation_seeds
        for m in args.ablation_molecules
        for v in PLANS["ablation"]
    ]
    plan = [run for part in args.plan for run in {"curve": curve, "ablation": ablation}[part]]
    todo = [run for run in plan if not (results / "runs" / f"{run.key}.json").exists()]

    def one(run: Run) -> None:
        print(f"{time.strftime('%H:%M:%S')} running {run.key}", flush=True)
        scores = train_run(run, data / run.molecule, work, args.curve)
        (results / "runs" / f"{run.key}.json").write_text(json.dumps(scores, indent=1))
        last = scores["curve"][-1]
        print(
            f"{time.strftime('%H:%M:%S')} {run.key}: test F {last['test_force_meV_per_A']:.1f} meV/Å, "
            f"E {last['test_energy_meV']:.1f} meV",
            flush=True,
        )

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    print(report(results, data))


if __name__ == "__main__":
    main()
