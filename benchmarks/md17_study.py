"""MD17-format study: where does DeNS lower force errors on GFN2-xTB molecular data?

Trains the small-data recipe (``configs/md17/xtb_small_data.yml``)
through ``fairchem --mode train`` as plain EquiformerV2, with DeNS, and with DeNS
ablations / sweeps, on a subset of the 950 training frames (fairchem's own
``dataset.train.first_n``: the train split is already a seeded permutation, so its
first n frames are a random subset, and val/test stay the same for every size).
Each run's best checkpoint (on the 50 validation frames) then predicts the test
frames through ``fairchem --mode predict``.

Resumable: every run writes ``<results>/runs/<key>.json`` when it is done and is
skipped when that file exists, so the script can be killed and restarted. The
checkpoints and logs go to ``--work`` (outside the repository).

    ./dens.sh run python benchmarks/md17_study.py --plan core          # run the core comparison
    ./dens.sh run python benchmarks/md17_study.py --plan sizes sweep   # then the rest
    ./dens.sh run python benchmarks/md17_study.py --report             # table + plots only

Data: ``fairchem-dens make-xtb-md17 ethanol ethanol.npz --frames 1500`` then
``fairchem-dens md17-to-lmdb ethanol.npz DATA`` (950/50/500).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fairchem_dens.quickstart import train_and_test
from fairchem_dens.resources import configs_dir

#: the small-data direct EquiformerV2 recipe this study trains (the quickstart's until issue 28)
RECIPE = "md17/xtb_small_data.yml"

P = "--optim.denoising_pos_params."

#: Variant name -> fairchem command-line overrides of the recipe (which is DeNS); the quickstart's first.
VARIANTS: dict[str, list[str]] = {
    "plain": ["--optim.use_denoising_pos=False"],
    "dens": [],
    "dens_no_force_encoding": ["--model.backbone.use_force_encoding=False"],
    "dens_multiscale": [f"{P}fixed_noise_std=False", f"{P}std_low=0.01", f"{P}std_high=0.1", f"{P}num_steps=10"],
    # corruption as input augmentation only: clean atoms of corrupted structures still learn
    # the original forces, the noise head gets no loss
    "dens_coef0": ["--optim.denoising_pos_coefficient=0.0"],
    "dens_coef1": ["--optim.denoising_pos_coefficient=1.0"],
    "dens_coef20": ["--optim.denoising_pos_coefficient=20.0"],
    "dens_const_coef": [f"{P}coefficient_schedule=constant"],
    "dens_std0.025": [f"{P}std=0.025"],
    "dens_std0.1": [f"{P}std=0.1"],
    "dens_prob0.5": [f"{P}prob=0.5"],
    "dens_prob1.0": [f"{P}prob=1.0"],
}
# Force normalisation: the un-suffixed variants divide forces by their own fitted rmsd (the recipe
# until the MD17 code's normalisation was added), `_enorm` by the training-set energy std
# (docs/algorithm.md#md17-recipe, the recipe since). Both are pinned here so stored runs stay reproducible.
_FORCE_RMSD = "--dataset.train.transforms.normalizer.fit.targets.forces.rmsd="
BASE = dict(VARIANTS)
VARIANTS.update({f"{name}_enorm": [*flags, f"{_FORCE_RMSD}energy"] for name, flags in BASE.items()})
VARIANTS.update({name: [*flags, f"{_FORCE_RMSD}None"] for name, flags in BASE.items()})
# The paper's MD17 force setting: gradient forces (conservative eSEN + noise head); its recipe
# already divides forces by the energy std.
CONSERVATIVE_RECIPE = "md17/esen/xtb_small_data_conservative.yml"
RECIPES = {f"esen_{name}": CONSERVATIVE_RECIPE for name in ("plain", "dens", "dens_no_force_encoding")}
VARIANTS.update({f"esen_{name}": BASE[name] for name in ("plain", "dens", "dens_no_force_encoding")})
# Issue 21, question 4: the same recipe (energy-std force normalisation) with a larger energy weight.
ENERGY_WEIGHT_RECIPES = {
    weight: Path(__file__).parent / "configs" / f"xtb_small_data_energy{weight}.yml" for weight in (20, 80)
}
for weight, path in ENERGY_WEIGHT_RECIPES.items():
    for name in ("plain", "dens"):
        VARIANTS[f"{name}_e{weight}_enorm"] = VARIANTS[f"{name}_enorm"]
        RECIPES[f"{name}_e{weight}_enorm"] = path  # absolute: configs_dir() / path is path
# and a diagnostic: the energy alone in the loss
VARIANTS["plain_energy_only"] = VARIANTS["plain_enorm"]
RECIPES["plain_energy_only"] = Path(__file__).parent / "configs" / "xtb_small_data_energy_only.yml"
VARIANTS["plain_energy_only_lr10x"] = [*VARIANTS["plain_enorm"], "--optim.lr_initial=0.005"]
RECIPES["plain_energy_only_lr10x"] = RECIPES["plain_energy_only"]
# capacity: 4x the channels, or 2x the layers
VARIANTS["plain_energy_only_c64"] = [
    *VARIANTS["plain_enorm"],
    "--model.backbone.sphere_channels=64",
    "--model.backbone.attn_hidden_channels=64",
    "--model.backbone.ffn_hidden_channels=128",
]
VARIANTS["plain_energy_only_layers4"] = [*VARIANTS["plain_enorm"], "--model.backbone.num_layers=4"]
for name in ("plain_energy_only_c64", "plain_energy_only_layers4"):
    RECIPES[name] = RECIPES["plain_energy_only"]
# Issue 21, question 1: the two-step eSEN recipe. Step 1 trains the direct eSEN (with or without
# DeNS) for half the epochs, `fairchem-dens to-conservative` converts its best checkpoint, step 2
# fine-tunes it conservatively without DeNS for the other half; the baseline is esen_plain, the
# conservative eSEN trained from scratch for all the epochs.
DIRECT_RECIPE = "md17/esen/xtb_small_data_direct.yml"
STEP2_RECIPE = "md17/esen/xtb_small_data_two_step_conservative.yml"
TWO_STEP = {"esen2_plain": BASE["plain"], "esen2_dens": BASE["dens"]}  # the recipes' own normalisation
VARIANTS.update(TWO_STEP)
# Step-2 variants: step 1 of their base variant, reused when it is done, and another step 2.
STEP2_VARIANTS = {f"{base}_e20": (base, configs_dir() / STEP2_RECIPE) for base in ("esen2_plain", "esen2_dens")}
# the base variants ran step 2 with the energy weighted 1, the shipped step 2 before it moved to 20
STEP2_E1 = Path(__file__).parent / "configs" / "xtb_small_data_two_step_conservative_e1.yml"
TWO_STEP.update({name: TWO_STEP[base] for name, (base, _) in STEP2_VARIANTS.items()})
VARIANTS.update({name: TWO_STEP[base] for name, (base, _) in STEP2_VARIANTS.items()})
# Short budgets (e.g. 950 frames x 20 epochs): `_short` variants scale the recipe's 10 warm-up
# epochs to a tenth of each training step, so no step is all warm-up.
SHORT = "_short"
for name in ("esen_plain", "esen2_plain", "esen2_dens", "plain_enorm", "dens_enorm", "plain", "dens"):
    VARIANTS[name + SHORT] = VARIANTS[name]
    RECIPES[name + SHORT] = RECIPES.get(name, RECIPE)
TWO_STEP.update({name + SHORT: TWO_STEP[name] for name in ("esen2_plain", "esen2_dens")})
# Issue 21, question 3: conservative DeNS with a smaller noise (a DeNS batch keeps the original
# labels, off at x + noise by about the Hessian times the noise: benchmarks/dens_label_mismatch.py)
# or only in the first fifth of training.
for name, flags in {
    "esen_dens_std0.01": [f"{P}std=0.01"],
    "esen_dens_std0.025": [f"{P}std=0.025"],
    "esen_dens_early20": [f"{P}early_epochs=20"],
}.items():
    VARIANTS[name], RECIPES[name] = flags, CONSERVATIVE_RECIPE


# Issue 21, question 2: the conservative eSEN pre-trained on another data set (--pretrained, a
# checkpoint path with {seed}), fine-tuned with and without DeNS; warm-up a tenth of the epochs.
FINETUNE_RECIPE = Path(__file__).parent / "configs" / "xtb_small_data_conservative_finetune.yml"
for name in ("plain", "dens"):
    VARIANTS[f"ft_{name}"], RECIPES[f"ft_{name}"] = BASE[name], FINETUNE_RECIPE
PRETRAINED: list[str] = []  # set by --pretrained


def warmup(variant: str, epochs: int) -> list[str]:
    """The warm-up override of a `_short` variant's training step of ``epochs`` epochs."""
    return (
        [f"--optim.scheduler_params.warmup_epochs={max(1, epochs // 10)}"]
        if variant.endswith(SHORT) or variant.startswith("ft_")
        else []
    )


@dataclass(frozen=True)
class Point:
    """One training run of the study."""

    variant: str
    n_train: int
    seed: int
    epochs: int

    @property
    def key(self) -> str:
        return f"{self.variant}-n{self.n_train}-e{self.epochs}-seed{self.seed}"


#: Plan part -> (variants, sizes): "core" trains at --n-core frames, "sizes" at the other --sizes.
PARTS: dict[str, tuple[list[str], str]] = {
    "core": (["plain", "dens", "dens_no_force_encoding"], "core"),
    "enorm": (["plain_enorm", "dens_enorm", "dens_no_force_encoding_enorm", "dens_coef0_enorm"], "core"),
    "esen": (["esen_plain", "esen_dens", "esen_dens_no_force_encoding"], "core"),
    "sizes": (["plain", "dens"], "sizes"),
    "sizes_enorm": (["plain_enorm", "dens_enorm"], "sizes"),
    "sweep": (
        [
            "dens_coef0",
            "dens_prob0.5",
            "dens_std0.025",
            "dens_std0.1",
            "dens_coef20",
            "dens_multiscale",
            "dens_coef1",
            "dens_const_coef",
            "dens_prob1.0",
        ],
        "core",
    ),
    "sweep_enorm": (
        [
            f"{v}_enorm"
            for v in ("dens_std0.025", "dens_std0.1", "dens_prob0.5", "dens_prob1.0", "dens_coef20", "dens_multiscale")
        ],
        "core",
    ),
    "energy_weight": (["plain_e20_enorm", "dens_e20_enorm", "plain_e80_enorm", "dens_e80_enorm"], "core"),
    "energy_only": (["plain_energy_only", "plain_energy_only_lr10x"], "core"),
    "energy_capacity": (["plain_energy_only_c64", "plain_energy_only_layers4"], "core"),
    "two_step": (["esen2_plain", "esen2_dens"], "core"),
    "two_step_e20": (["esen2_plain_e20", "esen2_dens_e20"], "core"),
    "two_step_short": (["esen_plain_short", "esen2_plain_short", "esen2_dens_short"], "core"),
    "direct_short": (["plain_enorm_short", "dens_enorm_short"], "core"),
    "direct_short_rmsd": (["plain_short", "dens_short"], "core"),  # forces divided by their own rmsd
    "finetune": (["ft_plain", "ft_dens"], "sizes"),
    "esen_noise": (["esen_dens_std0.01", "esen_dens_early20", "esen_dens_std0.025"], "core"),
}


def build_plan(parts: list[str], seeds: list[int], epochs: int, n_core: int, sizes: list[int]) -> list[Point]:
    """The runs of the requested parts; seeds outermost so a partial part still compares."""
    points: list[Point] = []
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r} ({', '.join(PARTS)})")
        variants, kind = PARTS[part]
        ns = [n_core] if kind == "core" else [n for n in sizes if n != n_core]
        for seed in seeds:
            for n in ns:
                for variant in variants:
                    point = Point(variant, n, seed, epochs)
                    if point not in points:
                        points.append(point)
    return points


def pretrained(point: Point) -> list[str]:
    """The fine-tuning start of a ft_ variant: --pretrained with this point's seed."""
    if not point.variant.startswith("ft_"):
        return []
    if not PRETRAINED:
        raise SystemExit(f"{point.variant} needs --pretrained (a checkpoint path, {{seed}} for the seed)")
    path = Path(PRETRAINED[0].format(seed=point.seed))
    if not path.exists():
        raise SystemExit(f"--pretrained: {path} does not exist")
    return [f"--model.finetune_config.starting_checkpoint={path}"]


def two_step(point: Point, data: Path, work: Path, results: Path, eval_every_epochs: int) -> dict:
    """Step 1 (direct) for half the epochs, to-conservative, step 2 (conservative) for the rest.

    The returned scores are the final conservative model's, with step 1's under ``step1``. A
    step-2 variant reuses its base variant's finished step 1 (same seed, frames and epochs).
    """
    run = work / point.key
    half = point.epochs // 2
    base, step2_recipe = STEP2_VARIANTS.get(point.variant, (point.variant, STEP2_E1))
    done = results / "runs" / f"{Point(base, point.n_train, point.seed, point.epochs).key}.json"
    if base != point.variant and done.exists():
        step1 = json.loads(done.read_text())["step1"]
    else:
        step1 = train_and_test(
            configs_dir() / DIRECT_RECIPE,
            run / "step1",
            data,
            n_train=point.n_train,
            seed=point.seed,
            epochs=half,
            overrides=[*TWO_STEP[point.variant], *warmup(point.variant, half)],
            eval_every_epochs=eval_every_epochs,
        )
    start = run / "step2_start.pt"
    subprocess.run(
        [sys.executable, "-m", "fairchem_dens.cli", "to-conservative", step1["checkpoint"], str(start), "--overwrite"],
        check=True,
        capture_output=True,
    )
    step2 = train_and_test(
        step2_recipe,
        run / "step2",
        data,
        n_train=point.n_train,
        seed=point.seed,
        epochs=point.epochs - half,
        overrides=warmup(point.variant, point.epochs - half),
        eval_every_epochs=eval_every_epochs,
        start_checkpoint=start,
    )
    return {**step2, "train_seconds": step1["train_seconds"] + step2["train_seconds"], "step1": step1}


def train_and_score(point: Point, data: Path, work: Path, results: Path, eval_every_epochs: int) -> dict:
    """Trains one point, predicts the test split with its best checkpoint, returns the numbers."""
    molecule = json.loads((data / "md17_info.json").read_text())["molecule"]
    if point.variant in TWO_STEP:
        return {
            "point": point.__dict__,
            "molecule": molecule,
            **two_step(point, data, work, results, eval_every_epochs),
        }
    scores = train_and_test(
        configs_dir() / RECIPES.get(point.variant, RECIPE),
        work / point.key,
        data,
        n_train=point.n_train,
        seed=point.seed,
        epochs=point.epochs,
        overrides=[*VARIANTS[point.variant], *warmup(point.variant, point.epochs), *pretrained(point)],
        eval_every_epochs=eval_every_epochs,
    )
    return {"point": point.__dict__, "molecule": molecule, **scores}


def load_results(results: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((results / "runs").glob("*.json"))]


def _groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for result in runs:
        p = result["point"]
        groups.setdefault((p["variant"], p["n_train"], p["epochs"]), []).append(result)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def baseline(variant: str) -> str:
    """The plain run a variant is compared with: same model family and force normalisation."""
    if variant.endswith(SHORT):
        return baseline(variant.removesuffix(SHORT)) + SHORT
    if variant.startswith("ft_"):
        return "ft_plain"
    if variant.startswith("esen"):  # esen_* and the two-step esen2_*: the conservative eSEN from scratch
        return "esen_plain"
    if variant.startswith("plain_energy_only"):
        return "plain_enorm"
    for weight in ENERGY_WEIGHT_RECIPES:
        if f"_e{weight}_" in variant:
            return f"plain_e{weight}_enorm"
    return "plain_enorm" if variant.endswith("_enorm") else "plain"


def overfitting(result: dict) -> float:
    """Test force MAE over the training log's force MAE (mean of its last 5 epochs): >> 1 = overfitting.

    The training log's MAE is over the clean atoms of the epoch's batches, as trained (DeNS
    batches log their corrupted atoms apart).
    """
    last = [value for _, value in result["train_force"][-5:]]
    return result["test_force_meV_per_A"] / statistics.mean(last)


def summarise(runs: list[dict]) -> str:
    """Markdown table: test force/energy MAE mean ± std per variant, size and epochs."""
    groups = _groups(runs)
    plain = {
        (r["point"]["variant"], r["point"]["n_train"], r["point"]["epochs"], r["point"]["seed"]): r[
            "test_force_meV_per_A"
        ]
        for r in runs
        if r["point"]["variant"] == baseline(r["point"]["variant"])
    }
    lines = [
        "| variant | train frames | epochs | F MAE test (meV/Å) | E MAE test (meV) | F ratio to its plain (same seeds) | "
        "same-seed ratios | best val F (meV/Å) | min train-log F (meV/Å) | test / train F | seeds | train min/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, n, epochs), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        plain_by_seed = {key[1:]: value for key, value in plain.items() if key[0] == baseline(variant)}
        force = _mean_std([r["test_force_meV_per_A"] for r in group])
        energy = _mean_std([r["test_energy_meV"] for r in group])
        best_val = _mean_std([min(v for _, v in r["val_force"]) for r in group if r["val_force"]] or [float("nan")])
        train = _mean_std([min(v for _, v in r["train_force"]) for r in group if r["train_force"]] or [float("nan")])
        overfit = _mean_std([overfitting(r) for r in group if r["train_force"]] or [float("nan")])
        minutes = statistics.mean(r["train_seconds"] for r in group) / 60
        paired = [
            r["test_force_meV_per_A"] / plain_by_seed[key]
            for r in group
            if (key := (n, epochs, r["point"]["seed"])) in plain_by_seed
        ]
        paired_text = f"{min(paired):.3f}–{max(paired):.3f}" if paired else "–"
        # ratio of means over the seeds both have, so a missing seed does not skew it
        common = [r for r in group if (n, epochs, r["point"]["seed"]) in plain_by_seed]
        ratio = (
            f"{statistics.mean(r['test_force_meV_per_A'] for r in common) / statistics.mean(plain_by_seed[(n, epochs, r['point']['seed'])] for r in common):.3f}"
            if common
            else "–"
        )
        lines.append(
            f"| {variant} | {n} | {epochs} | {force[0]:.2f} ± {force[1]:.2f} | {energy[0]:.2f} ± {energy[1]:.2f} "
            f"| {ratio} | {paired_text} | {best_val[0]:.1f} ± {best_val[1]:.1f} | {train[0]:.1f} | {overfit[0]:.1f} | {len(group)} "
            f"(seeds {','.join(str(r['point']['seed']) for r in group)}) | {minutes:.1f} |"
        )
    return "\n".join(lines)


def two_step_table(runs: list[dict]) -> str:
    """Question 1's table: each two-step arm against the conservative eSEN from scratch, seed by seed.

    Forces and energies of the final conservative model (and of step 1, the direct eSEN), the
    ratio of each arm's test force MAE to the from-scratch run of the same seed, and DeNS in
    step 1 against the plain step 1 with the same step 2.
    """
    by_key = {(r["point"]["variant"], r["point"]["n_train"], r["point"]["epochs"], r["point"]["seed"]): r for r in runs}
    lines = [
        "| train frames | epochs | arm | F MAE test (meV/Å) | E MAE test (meV) | step 1 (direct) F / E | "
        "F / from scratch, per seed | F / plain step 1, per seed | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    settings = sorted({(n, e) for (v, n, e, _) in by_key if v.startswith("esen2")})
    for n, epochs in settings:
        for arm in ("esen_plain", "esen2_plain", "esen2_dens", "esen2_plain_e20", "esen2_dens_e20"):
            suffix = SHORT if any(v.endswith(SHORT) for (v, vn, ve, _) in by_key if (vn, ve) == (n, epochs)) else ""
            variant = arm + suffix if not arm.endswith("_e20") else arm
            group = sorted(
                (r for (v, vn, ve, _), r in by_key.items() if (v, vn, ve) == (variant, n, epochs)),
                key=lambda r: r["point"]["seed"],
            )
            if not group:
                continue
            force = _mean_std([r["test_force_meV_per_A"] for r in group])
            energy = _mean_std([r["test_energy_meV"] for r in group])
            step1 = (
                f"{statistics.mean(r['step1']['test_force_meV_per_A'] for r in group):.1f} / "
                f"{statistics.mean(r['step1']['test_energy_meV'] for r in group):.1f}"
                if "step1" in group[0]
                else "–"
            )

            def ratios(other: str) -> str:
                values = [
                    r["test_force_meV_per_A"] / by_key[key]["test_force_meV_per_A"]
                    for r in group
                    if (key := (other, n, epochs, r["point"]["seed"])) in by_key
                ]
                return ", ".join(f"{v:.3f}" for v in values) or "–"

            plain_step1 = variant.replace("esen2_dens", "esen2_plain") if "esen2_dens" in variant else None
            lines.append(
                f"| {n} | {epochs} | {variant} | {force[0]:.1f} ± {force[1]:.1f} | {energy[0]:.1f} ± {energy[1]:.1f} "
                f"| {step1} | {ratios('esen_plain' + suffix) if arm != 'esen_plain' else '1'} "
                f"| {ratios(plain_step1) if plain_step1 else '–'} "
                f"| {','.join(str(r['point']['seed']) for r in group)} |"
            )
    return "\n".join(lines)


def _molecule(runs: list[dict]) -> str:
    return " / ".join(sorted({r.get("molecule", "ethanol") for r in runs}))  # the first runs were all ethanol


def plot(runs: list[dict], results: Path) -> list[Path]:
    """Validation force MAE against epoch, and test force MAE against training-set size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = _groups(runs)
    paths = []
    sizes = sorted({n for _, n, _ in groups})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for (variant, n_train, epochs), group in sorted(groups.items()):
            if n_train != n or not all(r["val_force"] for r in group):
                continue
            length = min(len(r["val_force"]) for r in group)
            curves = np.array([[v for _, v in r["val_force"][:length]] for r in group])
            x = [e for e, _ in group[0]["val_force"][:length]]
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(x, mean, label=f"{variant} ({len(group)} seeds)")
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation force MAE (meV/Å, 50 frames)")
        ax.set_title(f"GFN2-xTB {_molecule(runs)}, {n} training frames")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(results / "md17_study_val_vs_epoch.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in sorted({v for v, _, _ in groups}):
        points = sorted(
            (n, _mean_std([r["test_force_meV_per_A"] for r in g])) for (v, n, _), g in groups.items() if v == variant
        )
        if len(points) < 2 and variant.removesuffix("_enorm") not in ("plain", "dens"):
            continue
        ax.errorbar(
            [n for n, _ in points],
            [m for _, (m, _) in points],
            yerr=[s for _, (_, s) in points],
            marker="o",
            capsize=4,
            label=variant,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training frames")
    ax.set_ylabel("test force MAE (meV/Å, 500 frames)")
    ax.set_title(f"GFN2-xTB {_molecule(runs)}: test force MAE vs training-set size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(results / "md17_study_force_vs_size.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def report(results: Path) -> None:
    runs = load_results(results)
    if not runs:
        print("no finished runs yet")
        return
    table = summarise(runs)
    (results / "md17_study_table.md").write_text(table + "\n")
    print(table)
    if any(r["point"]["variant"].startswith("esen2") for r in runs):
        (results / "md17_two_step_table.md").write_text(two_step_table(runs) + "\n")
        print(two_step_table(runs))
    for path in plot(runs, results):
        print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/study/data/ethanol", help="md17-to-lmdb output folder")
    parser.add_argument("--work", default="/work/study/runs", help="run folders (checkpoints, logs)")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "md17_study"))
    parser.add_argument("--plan", nargs="*", default=[], help=f"parts to run: {', '.join(PARTS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--n-core", type=int, default=100, help="training frames of the core comparison and sweeps")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants of the plan")
    parser.add_argument("--eval-every-epochs", type=int, default=5)
    parser.add_argument("--report", action="store_true", help="only write the table and plots")
    parser.add_argument("--pretrained", help="finetune part: the pre-trained checkpoint, {seed} for the seed")
    args = parser.parse_args()
    results, work, data = Path(args.results).resolve(), Path(args.work).resolve(), Path(args.data).resolve()
    if args.pretrained:
        PRETRAINED.append(str(Path(args.pretrained).resolve()))
    (results / "runs").mkdir(parents=True, exist_ok=True)
    if not args.report:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        for point in build_plan(args.plan, args.seeds, args.epochs, args.n_core, args.sizes):
            if args.only and point.variant not in args.only:
                continue
            target = results / "runs" / f"{point.key}.json"
            if target.exists():
                continue
            print(f"{time.strftime('%H:%M:%S')} running {point.key}", flush=True)
            scores = train_and_score(point, data, work, results, args.eval_every_epochs)
            target.write_text(json.dumps(scores, indent=1))
            print(
                f"{time.strftime('%H:%M:%S')} {point.key}: test F {scores['test_force_meV_per_A']:.2f} meV/Å, "
                f"E {scores['test_energy_meV']:.2f} meV, {scores['train_seconds']:.0f} s",
                flush=True,
            )
    report(results)


if __name__ == "__main__":
    main()
