"""Where DeNS helps a conservative MD17 model on a CPU: encoding strength, data spacing, schedule, data size.

Trains ``configs/md17/esen/paper_md17_conservative.yml`` (conservative eSEN, a whole eSEN
block as noise head, the published MD17 DeNS settings, the force encoding in kcal/mol/Å)
through ``fairchem --mode train``, with DeNS and without (``--optim.use_denoising_pos=False``,
the same model and trainer), on GFN2-xTB molecules made by ``fairchem-dens make-xtb-md17``.
Each run keeps its weights at the epochs of its curve (``optim.keep_checkpoint_epochs``);
each kept checkpoint predicts the test split and the training split (test / train force MAE
says whether the model overfits). The groups, each over molecules and seeds:

* ``overfit100`` / ``overfit200``: 100 / 200 training frames 100 fs apart, the paper's
  1500-epoch schedule trained to its end (100 frames) or half-way (200 frames);
* ``paper950``: 950 frames 100 fs apart, the first 100 epochs of the paper's schedule
  (10 warm-up epochs, cosine over 1500, denoising weight decaying over 1500: ``optim.schedule_epochs``);
* ``spacing5fs``: the same on frames 5 fs apart (one 7.5 ps trajectory);
* ``fitted950``: 950 frames 100 fs apart, a 100-epoch schedule (warm-up and decay fitted to the run);
* ``encoding``: DeNS with the encoding in eV/Å (``force_encoding_scale`` 1) beside ``overfit100``
  and ``paper950``;
* ``linear``: the linear noise head in place of the block, beside ``overfit100``.

Resumable: a run writes ``<results>/runs/<key>.json`` when done and is skipped when it exists;
its checkpoints and logs go to ``--work`` (outside the repository), and a run that was cut off
restarts from scratch. Runs go in seed order (every group's seed 0 first), ``--jobs`` at a time,
one thread each.

    fairchem-dens make-xtb-md17 ethanol npz/ethanol_100fs.npz --frames 1500
    fairchem-dens make-xtb-md17 ethanol npz/ethanol_5fs.npz --frames 1500 --stride 10
    (and malonaldehyde)
    ./dens.sh run python benchmarks/dens_regime_study.py --npz npz --data DATA --jobs 2
    ./dens.sh run python benchmarks/dens_regime_study.py --npz npz --data DATA --report
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from fairchem_dens.datasets.md17 import convert_md17
from fairchem_dens.quickstart import (
    BATCH_SIZE,
    fairchem_command,
    null_model_errors,
    parse_curves,
    prediction_errors,
    run_logged,
    split_frames,
)
from fairchem_dens.resources import configs_dir

RECIPE = configs_dir() / "md17" / "esen" / "paper_md17_conservative.yml"
PAPER_EPOCHS, PAPER_WARMUP = 1500, 10
#: variant -> fairchem overrides of the recipe (DeNS, block noise head, encoding in kcal/mol/Å)
VARIANTS = {
    "plain": ["--optim.use_denoising_pos=False"],
    "dens": [],
    "dens_ev": ["--model.backbone.force_encoding_scale=1.0"],
    "dens_linear": ["--model.heads.energy.noise_head=linear"],
}
#: the published per-molecule loss weights (w_E, w_F) where they differ from the recipe's 1 / 80
WEIGHTS = {"malonaldehyde": (1, 100)}
TEST_FRAMES = 500


@dataclass(frozen=True)
class Group:
    frames: int
    spacing: str  # "100fs" or "5fs": which trajectory
    epochs: int  # the run's length
    schedule: int  # the schedule's length (PAPER_EPOCHS: the paper's, read at the epochs reached)
    curve: tuple[int, ...]
    variants: tuple[str, ...]


GROUPS = {
    "overfit100": Group(100, "100fs", 1500, PAPER_EPOCHS, (50, 150, 500, 1000, 1500), ("plain", "dens")),
    "paper950": Group(950, "100fs", 100, PAPER_EPOCHS, (10, 25, 50, 100), ("plain", "dens")),
    "encoding": Group(100, "100fs", 1500, PAPER_EPOCHS, (50, 150, 500, 1000, 1500), ("dens_ev",)),
    "spacing5fs": Group(950, "5fs", 100, PAPER_EPOCHS, (10, 25, 50, 100), ("plain", "dens")),
    "fitted950": Group(950, "100fs", 100, 100, (10, 25, 50, 100), ("plain", "dens")),
    "overfit200": Group(200, "100fs", 750, PAPER_EPOCHS, (50, 150, 375, 750), ("plain", "dens")),
    "encoding950": Group(950, "100fs", 100, PAPER_EPOCHS, (10, 25, 50, 100), ("dens_ev",)),
    "linear": Group(100, "100fs", 1500, PAPER_EPOCHS, (50, 150, 500, 1000, 1500), ("dens_linear",)),
}
#: the run each variant's same-seed ratio divides by, in the same group setting
COMPARATOR = {"dens": "plain", "dens_ev": "dens", "dens_linear": "dens"}
#: a group whose runs compare with another group's (the same frames, spacing and schedule)
BESIDE = {"encoding": "overfit100", "encoding950": "paper950", "linear": "overfit100"}


@dataclass(frozen=True)
class Run:
    group: str
    molecule: str
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.group}-{self.molecule}-{self.variant}-seed{self.seed}"


def data_folder(data: Path, npz: Path, molecule: str, spacing: str, frames: int) -> Path:
    """``md17-to-lmdb`` of ``<npz>/<molecule>_<spacing>.npz`` with ``frames`` training frames (made once)."""
    folder = data / f"{molecule}_{spacing}_n{frames}"
    if not folder.exists():
        convert_md17(npz / f"{molecule}_{spacing}.npz", folder, n_train=frames, n_val=50, seed=1)
    return folder


def scoring_copy(data: Path, work: Path) -> Path:
    """A copy of ``data``'s training split to score the training frames from (made once).

    fairchem's predict mode opens the train split too, and LMDB refuses a second open in one
    process. Make it before runs go in parallel: two runs copying at once would collide.
    """
    copy = work / "train_copies" / data.name
    if not copy.exists():
        shutil.copytree(data / "train", copy.with_suffix(".partial"), dirs_exist_ok=True)
        copy.with_suffix(".partial").rename(copy)
    return copy


def schedule_overrides(group: Group) -> list[str]:
    warmup = max(1, round(group.schedule * PAPER_WARMUP / PAPER_EPOCHS))  # the paper's share of the schedule
    return [
        f"--optim.max_epochs={group.epochs}",
        f"--optim.schedule_epochs={group.schedule}",
        f"--optim.scheduler_params.warmup_epochs={warmup}",
    ]


def molecule_overrides(molecule: str) -> list[str]:
    w_e, w_f = WEIGHTS.get(molecule, (1, 80))
    return [
        f"--loss_functions=[{{'energy': {{'fn': 'mae', 'coefficient': {w_e}}}}}, "
        f"{{'forces': {{'fn': 'l2mae', 'coefficient': {w_f}}}}}]"
    ]


def train_run(run: Run, data: Path, work: Path) -> dict:
    """Trains one run, then predicts test and train with each kept checkpoint."""
    group = GROUPS[run.group]
    folder = work / run.key
    if folder.exists() and not (folder / "trained").exists():
        shutil.rmtree(folder)  # cut off while training: start again
    folder.mkdir(parents=True, exist_ok=True)
    per_epoch = -(-group.frames // BATCH_SIZE)
    evaluate_every = per_epoch * max(1, group.epochs // 50)
    common = [
        "--config-yml",
        str(RECIPE),
        "--cpu",
        "--run-dir",
        str(folder),
        "--seed",
        str(run.seed),
        f"--dataset.train.src={data / 'train'}",
        f"--dataset.train.first_n={group.frames}",
        f"--dataset.val.src={data / 'val'}",
        f"--dataset.val.first_n={split_frames(data / 'val')}",
        *schedule_overrides(group),
        *molecule_overrides(run.molecule),
        *VARIANTS[run.variant],
    ]
    checkpoints = folder / "checkpoints" / "train"
    seconds = None
    if not (folder / "trained").exists():
        seconds = run_logged(
            [
                *fairchem_command(),
                "--mode",
                "train",
                "--timestamp-id",
                "train",
                *common,
                f"--optim.eval_every={evaluate_every}",
                f"--optim.checkpoint_every={per_epoch}",
                f"--print-every={evaluate_every}",
                f"--optim.keep_checkpoint_epochs=[{','.join(map(str, group.curve))}]",
                "--dataset.test.src={}".format(data / "test"),
                "--dataset.test.first_n=8",
            ],
            folder / "train.log",
            folder,
            threads=1,
        )
        (folder / "trained").write_text(f"{seconds}\n")
    seconds = float((folder / "trained").read_text())
    scored = {"test": (data / "test", TEST_FRAMES), "train": (scoring_copy(data, work), group.frames)}
    points = []
    for epoch in group.curve:
        point = {"epoch": epoch}
        for split, (source, count) in scored.items():
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
                        f"--dataset.test.src={source}",
                        f"--dataset.test.first_n={count}",
                    ],
                    folder / f"predict_{tag}.log",
                    folder,
                    threads=1,
                )
            energy, force = prediction_errors(predictions, source, first_n=count)
            point[f"{split}_energy_meV"], point[f"{split}_force_meV_per_A"] = energy, force
        points.append(point)
    return {
        "run": asdict(run),
        "group": asdict(group),
        "train_seconds": seconds,
        "curve": points,
        **parse_curves(folder / "train.log"),
    }


def mean_std(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(results: Path, data: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    by = {(r["run"]["group"], r["run"]["molecule"], r["run"]["variant"], r["run"]["seed"]): r for r in runs}
    lines = [
        "Test force MAE (meV/Å) and energy MAE (meV) at each epoch read, mean ± std over seeds; "
        "ratios are same-seed ratios of test force MAE to the comparator's (min–max) and the ratio of the means; "
        "test / train is the force MAE ratio of the same checkpoint.",
        "",
    ]
    for molecule in sorted({key[1] for key in by}):
        lines += [f"### {molecule}", ""]
        for spacing in ("100fs", "5fs"):
            folder = next(iter(sorted(data.glob(f"{molecule}_{spacing}_n*"))), None)
            if folder is not None:
                null = null_model_errors(folder, first_n=TEST_FRAMES)
                lines.append(
                    f"Frames {spacing} apart, test split: mean predictor {null['energy_meV']:.1f} meV, "
                    f"mean |F| component {null['force_meV_per_A']:.1f} meV/Å."
                )
        lines += [
            "",
            "| group | frames | spacing | epochs / schedule | variant | epoch | test F | test E | test / train F | "
            "F ratio, same seed | F ratio of means | E ratio of means | seeds |",
            "|---" * 13 + "|",
        ]
        for name, group in GROUPS.items():
            for variant in group.variants:
                seeds = sorted(s for (g, m, v, s) in by if (g, m, v) == (name, molecule, variant))
                if not seeds:
                    continue
                comparator_group = BESIDE.get(name, name)
                for epoch in group.curve:

                    def at(g: str, v: str, s: int) -> dict | None:
                        run = by.get((g, molecule, v, s))
                        return next((p for p in run["curve"] if p["epoch"] == epoch), None) if run else None

                    points = [p for s in seeds if (p := at(name, variant, s))]
                    other = COMPARATOR.get(variant)
                    pairs = [
                        (at(name, variant, s), at(comparator_group, other, s))
                        for s in seeds
                        if other and at(comparator_group, other, s)
                    ]
                    ratios = [a["test_force_meV_per_A"] / b["test_force_meV_per_A"] for a, b in pairs]
                    ratio_text = f"{min(ratios):.3f}–{max(ratios):.3f}" if ratios else "–"
                    of_means = (
                        f"{statistics.mean(a['test_force_meV_per_A'] for a, _ in pairs) / statistics.mean(b['test_force_meV_per_A'] for _, b in pairs):.3f}"
                        if pairs
                        else "–"
                    )
                    energy_of_means = (
                        f"{statistics.mean(a['test_energy_meV'] for a, _ in pairs) / statistics.mean(b['test_energy_meV'] for _, b in pairs):.2f}"
                        if pairs
                        else "–"
                    )
                    overfit = [p["test_force_meV_per_A"] / p["train_force_meV_per_A"] for p in points]
                    lines.append(
                        f"| {name} | {group.frames} | {group.spacing} | {group.epochs} / {group.schedule} | {variant} | {epoch} | "
                        f"{mean_std([p['test_force_meV_per_A'] for p in points])} | {mean_std([p['test_energy_meV'] for p in points])} | "
                        f"{mean_std(overfit, 2)} | {ratio_text} | {of_means} | {energy_of_means} | {len(points)} |"
                    )
        lines.append("")
    text = "\n".join(lines)
    (results / "README.md").write_text("# Where DeNS helps on a CPU (benchmarks/dens_regime_study.py)\n\n" + text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", required=True, help="folder of <molecule>_100fs.npz and <molecule>_5fs.npz")
    parser.add_argument("--data", required=True, help="folder for the md17-to-lmdb conversions")
    parser.add_argument("--molecules", nargs="+", default=["ethanol", "malonaldehyde"])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="/work/study/dens_regime", help="run folders (checkpoints, logs)")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "dens_regime_study"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only write the tables")
    args = parser.parse_args()
    results, work = Path(args.results).resolve(), Path(args.work).resolve()
    npz, data = Path(args.npz).resolve(), Path(args.data).resolve()
    (results / "runs").mkdir(parents=True, exist_ok=True)
    if not args.report:
        plan = [
            Run(g, m, v, s) for s in args.seeds for g in args.groups for m in args.molecules for v in GROUPS[g].variants
        ]
        todo = [run for run in plan if not (results / "runs" / f"{run.key}.json").exists()]
        folders = {
            run: data_folder(data, npz, run.molecule, GROUPS[run.group].spacing, GROUPS[run.group].frames)
            for run in todo
        }
        for folder in set(folders.values()):
            scoring_copy(folder, work)

        def one(run: Run) -> None:
            print(f"{time.strftime('%H:%M:%S')} running {run.key}", flush=True)
            scores = train_run(run, folders[run], work)
            (results / "runs" / f"{run.key}.json").write_text(json.dumps(scores, indent=1))
            last = scores["curve"][-1]
            print(
                f"{time.strftime('%H:%M:%S')} {run.key}: test F {last['test_force_meV_per_A']:.1f} meV/Å, "
                f"E {last['test_energy_meV']:.1f} meV, test / train F "
                f"{last['test_force_meV_per_A'] / last['train_force_meV_per_A']:.2f}",
                flush=True,
            )

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, todo))
    print(report(results, data))


if __name__ == "__main__":
    main()
