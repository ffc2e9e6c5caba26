"""The fairchem-2 quickstart: DeNS vs plain training on EMT bulk metals, through fairchem 2's ``fairchem -c``.

Generates the bulk data set (``make-emt-data --bulk --layout aselmdb``: seven fcc metals,
strained cells and Langevin MD frames with energy, forces and stress, split by structure
family), fits the recipe's element references and target scales on the training split
(``fit-normalizers``), trains the shipped recipe (``bulk_direct.yml``, or
``bulk_conservative.yml`` with ``--head conservative``) with and without DeNS for two
seeds, two runs at a time, predicts the test split with each final ``inference_ckpt.pt``
through fairchem 2's own predict unit, and prints per seed the errors of energy per atom,
forces and stress beside what the per-element references alone score (zero forces and
stress), the means and the DeNS / plain ratios. A validation-curve PNG is written beside
the runs.
"""

from __future__ import annotations

import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fairchem_dens.fairchem2.normalizers import fit_normalizers
from fairchem_dens.fairchem2.normalizers import overrides as normalizer_overrides
from fairchem_dens.fairchem2.predict import predict_structures, read_structures
from fairchem_dens.quickstart import fairchem_command, plot_validation_curves, run_logged
from fairchem_dens.resources import configs_dir

__all__ = ["DATA_SIZE", "RECIPES", "run_quickstart2", "test_errors"]

RECIPES = {"direct": "fairchem2/bulk_direct.yml", "conservative": "fairchem2/bulk_conservative.yml"}
#: make-emt-data --bulk arguments of the quickstart's data: 7 metals x 15 families x (1 + 9) = 1050 frames.
DATA_SIZE = {"families_per_metal": 15, "md_frames": 9, "seed": 0}
VARIANTS = {"plain": ["runner.train_eval_unit.dens.use_denoising_pos=False"], "dens": []}
TASK_NAME = "emt"  # the recipes' dataset_name


@dataclass
class Quickstart2Run:
    variant: str
    seed: int
    scores: dict


class _ValidationProgress:
    """The validation force MAE of each epoch in a ``fairchem -c`` log, as the quickstart echoes it."""

    def __init__(self) -> None:
        self.epoch = 0

    def __call__(self, line: str) -> str | None:
        if f"val/{TASK_NAME}.val,forces,mae:" not in line:
            return None
        self.epoch += 1
        return f"epoch {self.epoch:3d}  validation F MAE {1000 * float(line.split(':')[-1]):6.1f} meV/Å"


def validation_curve(log: Path) -> list[tuple[int, float]]:
    """``(epoch, validation force MAE in meV/Å)`` after each epoch of a ``fairchem -c`` log."""
    progress = _ValidationProgress()
    points = []
    for line in log.read_text().splitlines():
        if progress(line):
            points.append((progress.epoch, 1000 * float(line.split(":")[-1])))
    return points


def test_errors(checkpoint: Path, split: Path, elem_refs: list[float]) -> dict[str, float]:
    """Test errors of a model and of the element references alone (zero forces and stress).

    Energy per atom in meV/atom, force components in meV/Å, stress components in meV/Å³.
    """
    structures = [atoms for _, atoms in read_structures(split)]
    predicted = predict_structures(checkpoint, structures, task_name=TASK_NAME)
    refs = np.asarray(elem_refs)
    model, null = {"energy": [], "forces": [], "stress": []}, {"energy": [], "forces": [], "stress": []}
    for atoms, result in zip(structures, predicted):
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        model["energy"].append(abs(result["energy"] - energy) / len(atoms))
        null["energy"].append(abs(refs[atoms.numbers].sum() - energy) / len(atoms))
        model["forces"].append(np.abs(result["forces"] - forces).ravel())
        null["forces"].append(np.abs(forces).ravel())
        model["stress"].append(np.abs(result["stress"] - stress).ravel())
        null["stress"].append(np.abs(stress).ravel())
    scores = {}
    for name, errors in (("model", model), ("null", null)):
        scores[f"{name}_energy_meV_per_atom"] = 1000 * float(np.mean(errors["energy"]))
        scores[f"{name}_force_meV_per_A"] = 1000 * float(np.mean(np.concatenate(errors["forces"])))
        scores[f"{name}_stress_meV_per_A3"] = 1000 * float(np.mean(np.concatenate(errors["stress"])))
    return scores


def _data(workdir: Path) -> Path:
    """The quickstart's data in ``workdir/data`` (made once; a folder of other data is refused)."""
    from fairchem_dens.datasets.emt_bulk import generate_bulk_dataset

    data = workdir / "data"
    description = data / "dataset.json"
    if description.exists():
        made = json.loads(description.read_text())
        wanted = {
            "families_per_metal": DATA_SIZE["families_per_metal"],
            "md_frames": DATA_SIZE["md_frames"],
            "seed": DATA_SIZE["seed"],
        }
        if {key: made.get(key) for key in wanted} == wanted and (data / "aselmdb" / "test").is_dir():
            return data / "aselmdb"
    if data.exists():
        raise ValueError(
            f"{data} exists but is not the quickstart's data: choose another --workdir, or move that folder away"
        )
    print(f"Generating the EMT bulk data in {data} (7 metals, 1050 frames) ...", flush=True)
    generate_bulk_dataset(data, layouts=("aselmdb",), **DATA_SIZE)
    return data / "aselmdb"


def run_quickstart2(
    workdir: Path,
    *,
    head: str = "direct",
    seeds: tuple[int, ...] = (0, 1),
    epochs: int | None = None,
    jobs: int | None = None,
) -> list[Quickstart2Run]:
    """Runs the fairchem-2 quickstart and returns the runs.

    Args:
        workdir: where data, runs, logs and the plot go.
        head: ``direct`` or ``conservative`` (which recipe).
        seeds: training seeds; each trains both variants.
        epochs: training epochs (default: the recipe's).
        jobs: runs at a time (default: 2 on two or more CPU cores, else 1), each with ``cores // jobs`` threads.

    Raises:
        ValueError: a bad argument, or a ``data`` folder in ``workdir`` that is not the quickstart's,
            before anything runs.
    """
    if head not in RECIPES:
        raise ValueError(f"--head must be one of {', '.join(RECIPES)}, got {head!r}")
    for name, value in (("--epochs", epochs), ("--jobs", jobs)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name one or more different seeds, got {list(seeds)}")
    workdir = Path(workdir).resolve()
    data = _data(workdir)
    fitted = fit_normalizers(data / "train")
    cores = os.cpu_count() or 1
    jobs = jobs or max(1, min(2, cores))
    threads = max(1, cores // jobs)
    config = configs_dir() / RECIPES[head]
    plan = [(seed, variant) for seed in seeds for variant in VARIANTS]
    print(
        f"Training {len(plan)} runs of {config.name} ({', '.join(VARIANTS)} x seeds {', '.join(map(str, seeds))}), "
        f"{jobs} at a time with {threads} thread(s) each; logs in {workdir / 'runs'}",
        flush=True,
    )

    def one(seed_variant: tuple[int, str]) -> Quickstart2Run:
        seed, variant = seed_variant
        label = f"{variant} seed {seed}"
        run_dir = workdir / "runs" / f"{variant}-seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [
            *fairchem_command(),
            "-c",
            str(config),
            f"data_root={data}",
            *normalizer_overrides(fitted),
            f"job.seed={seed}",
            f"+job.run_dir={run_dir}",
            "+job.timestamp_id=run",
            *VARIANTS[variant],
        ]
        if epochs is not None:
            command.append(f"max_epochs={epochs}")
        log = run_dir / "train.log"
        seconds = run_logged(command, log, run_dir, label=label, threads=threads, progress=_ValidationProgress())
        checkpoint = run_dir / "run" / "checkpoints" / "final" / "inference_ckpt.pt"
        scores = {
            "train_seconds": seconds,
            "val_force": validation_curve(log),
            **test_errors(checkpoint, data / "test", fitted["elem_refs"]),
        }
        print(
            f"  [{label}] done in {seconds:.0f} s: test F MAE {scores['model_force_meV_per_A']:.1f} meV/Å", flush=True
        )
        return Quickstart2Run(variant, seed, scores)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = list(pool.map(one, plan))
    _report(runs, workdir, head)
    return runs


def _report(runs: list[Quickstart2Run], workdir: Path, head: str) -> None:
    by_key = {(run.variant, run.seed): run for run in runs}
    seeds = sorted({run.seed for run in runs})
    columns = (
        ("E/atom MAE", "(meV/atom)", "energy_meV_per_atom"),
        ("F MAE", "(meV/Å)", "force_meV_per_A"),
        ("stress MAE", "(meV/Å³)", "stress_meV_per_A3"),
    )
    width = 22
    lines = [
        f"{'model':<{width}}{'seed':>6}" + "".join(f"{title:>14}" for title, _, _ in columns) + f"{'train time':>12}",
        f"{'':<{width}}{'':>6}" + "".join(f"{unit:>14}" for _, unit, _ in columns) + f"{'(s)':>12}",
    ]
    null = runs[0].scores
    lines.append(
        f"{'element refs only':<{width}}{'':>6}" + "".join(f"{null['null_' + key]:>14.1f}" for *_, key in columns)
    )
    for variant in VARIANTS:
        for seed in seeds:
            scores = by_key[(variant, seed)].scores
            lines.append(
                f"{('DeNS' if variant == 'dens' else 'plain'):<{width}}{seed:>6}"
                + "".join(f"{scores['model_' + key]:>14.1f}" for *_, key in columns)
                + f"{scores['train_seconds']:>12.0f}"
            )
    means = {
        variant: {
            key: statistics.mean(by_key[(variant, s)].scores["model_" + key] for s in seeds) for *_, key in columns
        }
        for variant in VARIANTS
    }
    ratios = [
        by_key[("dens", s)].scores["model_force_meV_per_A"] / by_key[("plain", s)].scores["model_force_meV_per_A"]
        for s in seeds
    ]
    force, energy = "force_meV_per_A", "energy_meV_per_atom"
    lines += [
        "",
        f"'element refs only': the per-element energy references fitted on the training split, zero forces "
        f"and stress. Mean over seeds {', '.join(map(str, seeds))}: test F MAE DeNS {means['dens'][force]:.1f}, "
        f"plain {means['plain'][force]:.1f} meV/Å; DeNS / plain = "
        f"{means['dens'][force] / means['plain'][force]:.3f} (per seed {', '.join(f'{r:.3f}' for r in ratios)}); "
        f"energy DeNS / plain = {means['dens'][energy] / means['plain'][energy]:.3f}",
    ]
    table = "\n".join(lines)
    plot = plot_validation_curves(
        [
            (
                run.variant,
                run.seed,
                f"{'DeNS' if run.variant == 'dens' else 'plain'}, seed {run.seed}",
                run.scores["val_force"],
            )
            for run in runs
        ],
        workdir / "validation_curves.png",
        ylabel="validation force MAE (meV/Å)",
        title=f"EMT bulk metals, {head} eSCN-MD (fairchem 2)",
    )
    print("\n" + table)
    print("test: held-out structure families of the same seven metals (170 frames).")
    if plot:
        print(f"Validation curves: {plot}")
    summary = {
        f"{run.variant}-seed{run.seed}": {"variant": run.variant, "seed": run.seed, **run.scores} for run in runs
    }
    summary["mean"] = means
    summary["head"] = head
    (workdir / "quickstart2_results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "quickstart2_results.txt").write_text(table + "\n")
