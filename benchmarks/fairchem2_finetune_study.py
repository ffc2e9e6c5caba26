"""fairchem-2 fine-tuning study (issue 29): pre-train on six metals, fine-tune on the seventh with DeNS or without.

Run with the fairchem-2 environment's python. Everything goes through what a user runs:

* data: the quickstart2 data set (``make-emt-data --bulk --layout aselmdb``, 1050 frames, seven fcc
  metals), split by metal into ``pretrain`` (six metals) and ``heldout`` (the seventh, ``--heldout``);
  the held-out training frames are shuffled once, and a run with ``n`` frames takes the first ``n``;
* pre-training: ``fairchem -c bulk_direct.yml`` on ``pretrain`` without DeNS, one run per seed;
* fine-tuning: ``fairchem-dens finetune-config --head direct|conservative`` from that seed's
  ``inference_ckpt.pt`` on ``n`` held-out frames, then ``fairchem -c`` with DeNS or without
  (``runner.train_eval_unit.dens.use_denoising_pos=False``), the same seed;
* scoring: the final ``inference_ckpt.pt`` (no choice by validation) through fairchem 2's predict
  unit on the held-out metal's validation and test frames together (40 frames of four structure
  families: energy per atom, forces, stress), beside the element-references-only baseline.

Resumable: ``RESULTS/runs/<key>.json`` is written when a run is done and skipped when present.
Two runs at a time (one per core), each with one thread.

    python benchmarks/fairchem2_finetune_study.py --work /tmp/ft2 --seeds 0 1 2 --sizes 25 100
    python benchmarks/fairchem2_finetune_study.py --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fairchem_dens.datasets.emt_bulk import write_aselmdb
from fairchem_dens.fairchem2.normalizers import fit_normalizers
from fairchem_dens.fairchem2.normalizers import overrides as normalizer_overrides
from fairchem_dens.fairchem2.predict import read_structures
from fairchem_dens.fairchem2.quickstart import DATA_SIZE, test_errors
from fairchem_dens.quickstart import fairchem_command, run_logged
from fairchem_dens.resources import configs_dir

RESULTS = Path(__file__).parent / "results" / "fairchem2_finetune_study"
DIRECT = configs_dir() / "fairchem2" / "bulk_direct.yml"
#: fine-tuning epochs per training-set size: 150 to 200 optimiser steps (64 atoms a batch)
FINETUNE_EPOCHS = {25: 40, 100: 15}
DENS_OFF = "runner.train_eval_unit.dens.use_denoising_pos=False"


def prepare(work: Path, heldout: str) -> Path:
    """``work/data/{pretrain,heldout}/{train,val,test}/data.aselmdb`` from the quickstart2 data set."""
    from fairchem_dens.datasets.emt_bulk import generate_bulk_dataset

    data = work / "data"
    if (data / "heldout" / "metal.txt").exists():
        return data
    source = work / "generated"
    if not (source / "dataset.json").exists():
        generate_bulk_dataset(source, layouts=("aselmdb",), **DATA_SIZE)
    for split in ("train", "val", "test"):
        frames = [atoms for _, atoms in read_structures(source / "aselmdb" / split)]
        frames = [frames[i] for i in np.random.default_rng(0).permutation(len(frames))]
        subsets = {
            "heldout": [a for a in frames if set(a.get_chemical_symbols()) == {heldout}],
            "pretrain": [a for a in frames if heldout not in a.get_chemical_symbols()],
        }
        for name, subset in subsets.items():
            (data / name / split).mkdir(parents=True, exist_ok=True)
            write_aselmdb(subset, data / name / split / "data.aselmdb")
    scored = [atoms for split in ("val", "test") for _, atoms in read_structures(data / "heldout" / split)]
    (data / "heldout" / "scored").mkdir(parents=True, exist_ok=True)
    write_aselmdb(scored, data / "heldout" / "scored" / "data.aselmdb")
    (data / "heldout" / "metal.txt").write_text(heldout + "\n")
    return data


def subset(data: Path, n: int) -> Path:
    """The first ``n`` held-out training frames (the split is shuffled) with the held-out val split."""
    folder = data / f"heldout_n{n}"
    if not (folder / "train" / "data.aselmdb").exists():
        frames = [atoms for _, atoms in read_structures(data / "heldout" / "train")]
        if n > len(frames):
            raise SystemExit(f"--sizes {n}: the held-out metal has {len(frames)} training frames")
        (folder / "train").mkdir(parents=True, exist_ok=True)
        write_aselmdb(frames[:n], folder / "train" / "data.aselmdb")
    return folder


def pretrain(data: Path, work: Path, seed: int) -> Path:
    run_dir = work / "runs" / f"pretrain-seed{seed}"
    checkpoint = run_dir / "run" / "checkpoints" / "final" / "inference_ckpt.pt"
    if checkpoint.exists():
        return checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    fitted = fit_normalizers(data / "pretrain" / "train")
    run_logged(
        [
            *fairchem_command(),
            "-c",
            str(DIRECT),
            f"data_root={data / 'pretrain'}",
            *normalizer_overrides(fitted),
            f"job.seed={seed}",
            DENS_OFF,
            f"+job.run_dir={run_dir}",
            "+job.timestamp_id=run",
        ],
        run_dir / "train.log",
        run_dir,
        threads=1,
    )
    return checkpoint


def finetune(data: Path, work: Path, head: str, n: int, dens: bool, seed: int) -> dict:
    key = f"{head}-n{n}-{'dens' if dens else 'plain'}-seed{seed}"
    result_file = RESULTS / "runs" / f"{key}.json"
    run_dir = work / "runs" / key
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if "train_force_meV_per_A" not in result:  # runs scored before the train error was recorded
            result.update(_train_errors(run_dir, subset(data, n)))
            result_file.write_text(json.dumps(result, indent=2))
        return result
    checkpoint = pretrain(data, work, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = subset(data, n)
    config = run_dir / "finetune.yml"
    if not config.exists():
        run_logged(
            [
                sys.executable,
                "-m",
                "fairchem_dens.cli",
                "finetune-config",
                "--checkpoint",
                str(checkpoint),
                "--train",
                str(folder / "train"),
                "--val",
                str(data / "heldout" / "val"),
                "--head",
                head,
                "--epochs",
                str(FINETUNE_EPOCHS[n]),
                "--out",
                str(run_dir),
            ],
            run_dir / "config.log",
            run_dir,
        )
    seconds = run_logged(
        [
            *fairchem_command(),
            "-c",
            str(config),
            f"job.seed={seed}",
            f"+job.run_dir={run_dir}",
            "+job.timestamp_id=run",
            *([] if dens else [DENS_OFF]),
        ],
        run_dir / "train.log",
        run_dir,
        threads=1,
    )
    refs = fit_normalizers(folder / "train")["elem_refs"]
    scores = test_errors(
        run_dir / "run" / "checkpoints" / "final" / "inference_ckpt.pt", data / "heldout" / "scored", refs
    )
    result = {
        "key": key,
        "head": head,
        "n_train": n,
        "dens": dens,
        "seed": seed,
        "train_seconds": seconds,
        "epochs": FINETUNE_EPOCHS[n],
        **scores,
        **_train_errors(run_dir, folder),
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    print(
        f"{key}: F {scores['model_force_meV_per_A']:.1f} meV/Å, E {scores['model_energy_meV_per_atom']:.1f} "
        f"meV/atom ({seconds:.0f} s)",
        flush=True,
    )
    return result


def _train_errors(run_dir: Path, folder: Path) -> dict:
    """The model's force error on its own training frames (test / train tells whether it overfits)."""
    scores = test_errors(
        run_dir / "run" / "checkpoints" / "final" / "inference_ckpt.pt",
        folder / "train",
        fit_normalizers(folder / "train")["elem_refs"],
    )
    return {"train_force_meV_per_A": scores["model_force_meV_per_A"]}


def report() -> None:
    runs = [json.loads(p.read_text()) for p in sorted((RESULTS / "runs").glob("*.json"))]
    groups: dict[tuple, dict[int, dict]] = {}
    for run in runs:
        groups.setdefault((run["head"], run["n_train"], run["dens"]), {})[run["seed"]] = run
    columns = (
        ("force_meV_per_A", "F (meV/Å)"),
        ("energy_meV_per_atom", "E (meV/atom)"),
        ("stress_meV_per_A3", "stress (meV/Å³)"),
    )
    lines = [
        "| head | frames | | " + " | ".join(title for _, title in columns) + " | test / train F | seeds |",
        "|---|---|---|" + "---|" * len(columns) + "---|---|",
    ]
    for (head, n, dens), by_seed in sorted(groups.items()):
        cells = []
        for key, _ in columns:
            values = [run[f"model_{key}"] for run in by_seed.values()]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        overfit = [
            run["model_force_meV_per_A"] / run["train_force_meV_per_A"]
            for run in by_seed.values()
            if "train_force_meV_per_A" in run
        ]
        spread = f"{min(overfit):.2f}–{max(overfit):.2f}" if overfit else "n/a"
        lines.append(
            f"| {head} | {n} | {'DeNS' if dens else 'plain'} | "
            + " | ".join(cells)
            + f" | {spread} | {', '.join(map(str, sorted(by_seed)))} |"
        )
    lines += ["", "DeNS / plain, same seed (test force MAE; energy per atom):"]
    for (head, n, dens), by_seed in sorted(groups.items()):
        plain = groups.get((head, n, False), {})
        if not dens or not plain:
            continue
        seeds = sorted(set(by_seed) & set(plain))
        forces = [by_seed[s]["model_force_meV_per_A"] / plain[s]["model_force_meV_per_A"] for s in seeds]
        energies = [by_seed[s]["model_energy_meV_per_atom"] / plain[s]["model_energy_meV_per_atom"] for s in seeds]
        lines.append(
            f"- {head}, {n} frames: forces {', '.join(f'{r:.3f}' for r in forces)} "
            f"(mean {statistics.mean(forces):.3f}); energy {', '.join(f'{r:.3f}' for r in energies)}"
        )
    if runs:
        null = runs[0]
        lines.append(
            f"\nElement references only (zero forces and stress), held-out test: F "
            f"{null['null_force_meV_per_A']:.1f} meV/Å, E {null['null_energy_meV_per_atom']:.1f} meV/atom, "
            f"stress {null['null_stress_meV_per_A3']:.1f} meV/Å³ (references fitted on {null['n_train']} frames)"
        )
    text = "\n".join(lines)
    print(text)
    (RESULTS / "report.md").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fairchem2_finetune_study"))
    parser.add_argument("--heldout", default="Pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--heads", nargs="+", default=["direct", "conservative"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        report()
        return
    data = prepare(args.work, args.heldout)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # the pre-trainings first, one per core
        list(pool.map(lambda seed: pretrain(data, args.work, seed), args.seeds))
    plan = [
        (head, n, dens, seed)
        for seed in args.seeds
        for n in args.sizes
        for head in args.heads
        for dens in (False, True)
    ]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda point: finetune(data, args.work, *point), plan))
    report()


if __name__ == "__main__":
    main()
