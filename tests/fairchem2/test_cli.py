"""A real ``fairchem -c`` DeNS run on fairchem 2: training, what the model is fed, checkpoints, 2 ranks."""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairchem_dens.testing.tolerances import LOSS_REL

from fc2_helpers import DIRECT_CONFIG, FINETUNE_CONFIG, fairchem_env, run_fairchem

LOG_DICT = re.compile(r"^INFO:root:(\{.*\})$", re.MULTILINE)


def _logged_dicts(log: str) -> list[dict]:
    return [ast.literal_eval(m) for m in LOG_DICT.findall(log) if "train/" in m]


def test_cli_training_logs_finite_loss_denoising_metrics_and_writes_checkpoints(direct_run):
    dicts = _logged_dicts(direct_run["log"])
    losses = [d["train/loss"] for d in dicts if "train/loss" in d]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)  # 2 epochs x 4 batches
    epoch_metrics = [d for d in dicts if "dens_epoch" in d]
    assert [d["dens_epoch"] for d in epoch_metrics] == [1, 2]
    for d in epoch_metrics:
        # the noise in Å (std 0.05: a mean |noise component| of 0.04 for a zero prediction)
        assert 0 < d["train/denoising_pos_mae"] < 0.5
        assert math.isfinite(d["train/denoising_energy_mae"]) and math.isfinite(d["train/denoising_force_mae"])
    assert re.search(r"DeNS epoch 1: corrupted \d+/16 structures", direct_run["log"])
    final = direct_run["dir"] / "checkpoints" / "final"
    assert (final / "inference_ckpt.pt").is_file() and (final / "resume.yaml").is_file()


def test_the_unit_trains_on_the_batch_core_corrupt_batch_makes_and_never_corrupts_eval(direct_run):
    records = json.loads((direct_run["records"] / "rank0.json").read_text())
    train = records["train"]
    assert [r["step"] for r in train] == list(range(8))
    assert {r["dens"] for r in train} == {True, False}  # seed 2: both kinds of batch
    for r in train:
        assert r["dens"] == r["expected_dens"]
        assert r["pos_equal"], f"step {r['step']}: the model saw other positions than core.corrupt_batch makes"
        if r["dens"]:  # corrupt_ratio 0.5: some atoms of the batch, not all
            assert 0 < r["corrupted_atoms"] < r["atoms"]
    assert records["eval"] and not any(e["dens"] or e["noise_vec"] for e in records["eval"])


PLAIN = "fairchem.core.models.uma.escn_md."
PREDICT = """
import sys
sys.modules['fairchem_dens'] = None  # importing the plugin now fails
import numpy as np
from ase.build import bulk, molecule
from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
from fairchem.core.units.mlip_unit import load_predict_unit
unit = load_predict_unit(sys.argv[1], 'batch', device='cpu')
if sys.argv[2] == 'molecule':  # the MD17 recipe's data: a molecule in a 50 A box, pbc off
    atoms, task = molecule('CH3OH', cell=[50, 50, 50], pbc=False), 'md17'
else:
    atoms, task = bulk('Cu', 'fcc', cubic=True), 'emt'
atoms.rattle(0.05, seed=3)
atoms.calc = FAIRChemCalculator(unit, task_name=task)
energy, forces = atoms.get_potential_energy(), atoms.get_forces()
assert np.isfinite(energy) and forces.shape == (len(atoms), 3) and np.isfinite(forces).all()
if sys.argv[2] == 'stress':
    assert np.isfinite(atoms.get_stress()).all()
print('OK', energy)
"""


@pytest.mark.parametrize(
    "run, heads",
    [
        ("direct_run", {"energy": PLAIN + "MLP_Energy_Head", "forces": PLAIN + "Linear_Force_Head"}),
        ("finetune_run", {"energy": PLAIN + "MLP_EFS_Head"}),
        ("uma_run", {"efs": PLAIN + "MLP_EFS_Head"}),
        ("md17_run", {"energy": PLAIN + "MLP_EFS_Head"}),
    ],
)
def test_inference_checkpoint_is_plain_fairchem_and_runs_without_the_plugin(run, heads, request, tmp_path):
    path = request.getfixturevalue(run)["dir"] / "checkpoints" / "final" / "inference_ckpt.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    backbone = "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone" if run == "uma_run" else PLAIN + "eSCNMDBackbone"
    assert checkpoint.model_config["backbone"]["model"] == backbone
    assert {name: head["module"] for name, head in checkpoint.model_config["heads"].items()} == heads
    for state in (checkpoint.model_state_dict, checkpoint.ema_state_dict):
        assert not [k for k in state if "force_embedding" in k or "noise_linear" in k or "noise_block" in k]
    assert all("noise_head" not in head for head in checkpoint.model_config["heads"].values())
    script = tmp_path / "predict.py"
    script.write_text(PREDICT)
    result = subprocess.run(
        [sys.executable, str(script), str(path), {"direct_run": "-", "md17_run": "molecule"}.get(run, "stress")],
        capture_output=True,
        text=True,
        env=fairchem_env(),
        timeout=180,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_conservative_finetuning_from_the_direct_checkpoint_trains_with_dens(finetune_run):
    log = finetune_run["log"]
    assert "backbone loaded, pretrained weights kept in heads ['energy']" in log
    dicts = _logged_dicts(log)
    losses = [d["train/loss"] for d in dicts if "train/loss" in d]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    (epoch,) = [d for d in dicts if "dens_epoch" in d]
    assert 0 < epoch["train/denoising_pos_mae"] < 0.5
    assert re.search(r"val/emt\.val,stress,mae: \d", log)
    assert (finetune_run["dir"] / "checkpoints" / "final" / "resume.yaml").is_file()


def test_two_ranks_take_the_same_batch_decisions(emt_root, tmp_path):
    overrides = [
        f"data_root={emt_root}",
        f"+job.run_dir={tmp_path}",
        "+job.timestamp_id=t2",
        "+job.scheduler.ranks_per_node=2",
        "max_epochs=1",
        "checkpoint_every=null",
        "max_atoms=12",  # 2 validation batches for 2 ranks
        "runner.train_eval_unit._target_=recording_unit.RecordingUnit",
        f"+runner.train_eval_unit.record_dir={tmp_path}/records",
    ]
    run_fairchem(DIRECT_CONFIG, overrides, tmp_path / "fairchem.log")
    ranks = [json.loads((tmp_path / "records" / f"rank{r}.json").read_text())["train"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) >= 2
    assert [r["dens"] for r in ranks[0]] == [r["dens"] for r in ranks[1]]
    assert {r["dens"] for r in ranks[0]} == {True, False}
    assert all(r["pos_equal"] and r["dens"] == r["expected_dens"] for rank in ranks for r in rank)


def test_a_run_resumed_from_its_step_0_checkpoint_repeats_the_same_losses(finetune_run, tmp_path):
    """fairchem's resume.yaml rebuilds the DeNS unit and model; the corruption comes from (seed, step,
    rank), so the resumed run draws the same noise and gives bit-identical losses."""
    copy = tmp_path / "ft"
    shutil.copytree(finetune_run["dir"], copy)
    resume = copy / "checkpoints" / "step_0" / "resume.yaml"
    resume.write_text(resume.read_text().replace(str(finetune_run["dir"]), str(copy)))
    log = run_fairchem(resume, [], tmp_path / "resumed.log")
    assert f"Done loading checkpoint from {copy}/checkpoints/step_0" in log
    losses = [
        [d["train/loss"] for d in _logged_dicts(text) if "train/loss" in d] for text in (finetune_run["log"], log)
    ]
    assert len(losses[1]) == 4 and losses[1] == losses[0]


def test_uma_finetuning_config_trains_a_uma_shaped_checkpoint_with_dens(uma_run):
    losses = [d["train/loss"] for d in _logged_dicts(uma_run["log"]) if "train/loss" in d]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    (epoch,) = [d for d in _logged_dicts(uma_run["log"]) if "dens_epoch" in d]
    assert 0 < epoch["train/denoising_pos_mae"] < 0.5
    exported = torch.load(uma_run["dir"] / "checkpoints" / "final" / "inference_ckpt.pt", weights_only=False)
    assert exported.model_config["model_id"] == "tiny-test-uma"


def test_md17_recipe_trains_conservatively_with_the_block_noise_head_by_structure(md17_run):
    log = md17_run["log"]
    dicts = _logged_dicts(log)
    losses = [d["train/loss"] for d in dicts if "train/loss" in d]
    assert losses and all(math.isfinite(v) for v in losses)
    epochs = [d for d in dicts if "dens_epoch" in d]
    assert len(epochs) == 2 and all(0 < e["train/denoising_pos_mae"] < 0.5 for e in epochs)
    # per-structure selection: a corrupted structure has 25 % of its 6 atoms noised, at least one
    (line,) = re.findall(r"DeNS epoch 1: corrupted (\d+)/(\d+) structures .*?, (\d+)/(\d+) atoms", log)[:1]
    structures, atoms = int(line[0]), int(line[2])
    assert 0 < structures and structures <= atoms <= 2 * structures


def test_predictions_of_a_fairchem2_model_become_a_checked_submission(direct_run, emt_root, tmp_path):
    """predict-s2ef (fairchem 2's predict unit) -> make-submission: the archive of the 1.10 side."""
    import numpy as np
    from ase.constraints import FixAtoms
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
    from fairchem.core.units.mlip_unit import load_predict_unit

    from fairchem_dens.fairchem2.predict import read_structures

    checkpoint = direct_run["dir"] / "checkpoints" / "final" / "inference_ckpt.pt"
    predictions = tmp_path / "s2ef_predictions.npz"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "predict-s2ef",
            str(checkpoint),
            str(emt_root / "val"),
            "--out",
            str(predictions),
            "--task-name",
            "emt",
            "--batch-size",
            "3",
        ],
        capture_output=True,
        text=True,
        env=fairchem_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    structures = list(read_structures(emt_root / "val"))
    with np.load(predictions) as npz:
        ids, energy, forces, chunks = npz["ids"], npz["energy"], npz["forces"], npz["chunk_idx"]
    assert ids.tolist() == [name for name, _ in structures] == [f"{i}_0" for i in range(len(structures))]
    # each structure's prediction is what fairchem's own calculator gives, fixed atoms left out
    unit = load_predict_unit(str(checkpoint), "batch", device="cpu")
    for (name, atoms), e, f in zip(structures, energy, np.split(forces, chunks)):
        free = np.ones(len(atoms), dtype=bool)
        for constraint in atoms.constraints:
            if isinstance(constraint, FixAtoms):
                free[constraint.index] = False
        atoms.calc = FAIRChemCalculator(unit, task_name="emt")
        # a batch of 3 against one structure: the same float32 arithmetic summed in another order
        # (edge scatters, the energy sum) through two layers and a gradient; 1e-4 of the values'
        # scale is ~800 ulps, far above that round-off and far below any real difference
        scale = max(1.0, float(np.abs(atoms.get_forces()).max()))
        assert abs(e - atoms.get_potential_energy()) <= 1e-4 * max(1.0, abs(e)), name
        assert np.abs(f - atoms.get_forces()[free]).max() <= 1e-4 * scale, name
    assert any(len(a) != int(n) for (_, a), n in zip(structures, np.diff(np.r_[0, chunks, len(forces)])))
    # the submission builder takes it like a fairchem-1 prediction file
    out = tmp_path / "submission.npz"
    args = [f"--{split}={predictions}" for split in ("id", "ood-ads", "ood-cat", "ood-both")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "make-submission",
            "s2ef",
            "--dataset",
            "oc20",
            *args,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=fairchem_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as archive:
        assert sorted(archive.files) == sorted(
            f"{split}_{key}"
            for split in ("id", "ood_ads", "ood_cat", "ood_both")
            for key in ("ids", "energy", "forces", "chunk_idx")
        )
    # a second run refuses to overwrite, naming the file
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairchem_dens.cli",
            "predict-s2ef",
            str(checkpoint),
            str(emt_root / "val"),
            "--out",
            str(predictions),
            "--task-name",
            "emt",
        ],
        capture_output=True,
        text=True,
        env=fairchem_env(),
        timeout=300,
    )
    assert again.returncode != 0 and f"{predictions} exists" in again.stderr


def test_a_run_resumed_mid_epoch_repeats_the_rest_of_the_epoch(finetune_run, emt_root, tmp_path):
    """A checkpoint after step 2 of the 4-step epoch: fairchem resumes its data loader there, and the
    DeNS draws come from (seed, step, rank), so steps 3 and 4 see the original run's batches and noise.
    Their losses agree to float32 round-off, not bit for bit as from step 0 (measured: 1e-11
    relative, the reloaded optimizer state's last digits); another batch or draw moves them by %."""
    overrides = [
        f"data_root={emt_root}",
        f"checkpoint={finetune_run['checkpoint']}",
        "checkpoint_every=2",
        f"+job.run_dir={tmp_path}",
        "+job.timestamp_id=mid",
    ]
    original = run_fairchem(FINETUNE_CONFIG, overrides, tmp_path / "original.log")
    resume = tmp_path / "mid" / "checkpoints" / "step_2" / "resume.yaml"
    assert resume.is_file(), sorted(p.name for p in (tmp_path / "mid" / "checkpoints").iterdir())
    log = run_fairchem(resume, [], tmp_path / "resumed.log")
    losses = [[d["train/loss"] for d in _logged_dicts(text) if "train/loss" in d] for text in (original, log)]
    assert len(losses[0]) == 4 and len(losses[1]) == 2
    for resumed, expected in zip(losses[1], losses[0][2:]):
        assert resumed == pytest.approx(expected, rel=LOSS_REL, abs=0)
    # negative control: the steps' own losses are far apart at this tolerance
    assert losses[0][2] != pytest.approx(losses[0][3], rel=LOSS_REL, abs=0)


def test_a_decaying_denoising_weight_and_early_epochs_in_a_real_run(emt_root, tmp_path):
    """coefficient_schedule linear_decay: lambda_D(t) = 5 (1 - t), t the fraction of the run done at
    the step; early_epochs 1: no DeNS batch in the second of the two epochs."""
    params = "runner.train_eval_unit.dens.denoising_pos_params"
    overrides = [
        f"data_root={emt_root}",
        f"+job.run_dir={tmp_path}",
        "+job.timestamp_id=t1",
        "runner.train_eval_unit._target_=recording_unit.RecordingUnit",
        f"+runner.train_eval_unit.record_dir={tmp_path}/records",
        f"{params}.prob=1.0",
        f"+{params}.coefficient_schedule=linear_decay",
        f"+{params}.early_epochs=1",
    ]
    run_fairchem(DIRECT_CONFIG, overrides, tmp_path / "fairchem.log")
    records = json.loads((tmp_path / "records" / "rank0.json").read_text())["train"]
    first = [r for r in records if r["epoch"] == 0]
    assert first and all(r["dens"] for r in first) and not any(r["dens"] for r in records if r["epoch"] == 1)
    for record in first:
        fraction = record["step"] / (2 * record["steps_in_epoch"])  # 2 epochs; steps counted before this one
        assert record["coefficient"] == pytest.approx(5.0 * (1.0 - fraction), rel=1e-12)
    assert first[0]["coefficient"] > first[-1]["coefficient"]


def test_a_skip_filter_in_a_real_run_keeps_high_force_structures_clean(emt_root, tmp_path):
    params = "runner.train_eval_unit.dens.denoising_pos_params"
    limit = 2.0  # eV/Å: the rattled EMT cells hold |F_i| on both sides of it
    overrides = [
        f"data_root={emt_root}",
        f"+job.run_dir={tmp_path}",
        "+job.timestamp_id=t1",
        "runner.train_eval_unit._target_=recording_unit.RecordingUnit",
        f"+runner.train_eval_unit.record_dir={tmp_path}/records",
        f"{params}.prob=1.0",
        f"+{params}.max_force_norm={limit}",
    ]
    run_fairchem(DIRECT_CONFIG, overrides, tmp_path / "fairchem.log")
    records = json.loads((tmp_path / "records" / "rank0.json").read_text())["train"]
    structures = [(force, corrupted) for r in records for force, corrupted in zip(r["max_force"], r["corrupted"])]
    assert all(force <= limit for force, corrupted in structures if corrupted)
    assert any(corrupted for _, corrupted in structures)  # the filter left DeNS on
    assert any(force > limit for force, _ in structures)  # and had something to filter
    assert all(r["pos_equal"] and r["dens"] == r["expected_dens"] for r in records)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # a misspelt key inside the unit's own `dens:` block would otherwise train with the recipe's values
        (
            "+runner.train_eval_unit.dens.denoising_pos_parmas.prob=0.5",
            "unknown DeNS key runner.train_eval_unit.dens.denoising_pos_parmas (nearest known key: "
            "runner.train_eval_unit.dens.denoising_pos_params)",
        ),
        (
            "+runner.train_eval_unit.dens.denoising_pos_params.corupt_ratio=0.5",
            "unknown DeNS key runner.train_eval_unit.dens.denoising_pos_params.corupt_ratio (nearest known key: "
            "runner.train_eval_unit.dens.denoising_pos_params.corrupt_ratio)",
        ),
        # values are named where the user wrote them, not where fairchem 1 keeps them
        (
            "runner.train_eval_unit.dens.denoising_pos_params.prob=1.5",
            "runner.train_eval_unit.dens.denoising_pos_params.prob must be a probability in [0, 1], got 1.5",
        ),
    ],
)
def test_a_misspelt_or_bad_dens_key_is_refused_before_anything_is_written(emt_root, tmp_path, override, message):
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("fairchem")),
            "-c",
            str(DIRECT_CONFIG),
            f"data_root={emt_root}",
            f"+job.run_dir={tmp_path}/run",
            "+job.timestamp_id=t1",
            override,
        ],
        capture_output=True,
        text=True,
        env=fairchem_env(),
        timeout=240,
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "run" / "t1" / "checkpoints").exists()


def test_relaxation_only_reads_the_md_flag_of_each_row_and_never_corrupts_md_frames(emt_root, tmp_path):
    params = "runner.train_eval_unit.dens.denoising_pos_params"
    overrides = [
        f"data_root={emt_root}",
        f"+job.run_dir={tmp_path}",
        "+job.timestamp_id=t1",
        "runner.train_eval_unit._target_=recording_unit.RecordingUnit",
        f"+runner.train_eval_unit.record_dir={tmp_path}/records",
        f"{params}.prob=1.0",
        f"+{params}.relaxation_only=True",
        "dataset.format=fairchem_dens.fairchem2.datasets.DeNSAseDBDataset",
    ]
    run_fairchem(DIRECT_CONFIG, overrides, tmp_path / "fairchem.log")
    records = json.loads((tmp_path / "records" / "rank0.json").read_text())["train"]
    structures = [(md, corrupted) for r in records for md, corrupted in zip(r["md"], r["corrupted"])]
    assert all(md == 0 for md, corrupted in structures if corrupted)
    assert any(corrupted for _, corrupted in structures)  # relaxation frames were still corrupted
    assert any(md == 1 for md, _ in structures)  # and MD frames were there to keep clean
    assert all(r["pos_equal"] and r["dens"] == r["expected_dens"] for r in records)


def test_relaxation_only_on_a_dataset_without_md_flags_is_refused_before_the_first_step(emt_root, tmp_path):
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("fairchem")),
            "-c",
            str(DIRECT_CONFIG),
            f"data_root={emt_root}",
            f"+job.run_dir={tmp_path}",
            "+job.timestamp_id=t1",
            "+runner.train_eval_unit.dens.denoising_pos_params.relaxation_only=True",
        ],
        capture_output=True,
        text=True,
        env=fairchem_env(),
        timeout=240,
    )
    assert result.returncode != 0
    assert (
        "runner.train_eval_unit.dens.denoising_pos_params.relaxation_only is set but the training dataset "
        "gives no `md` flag"
    ) in result.stdout + result.stderr
    assert "fairchem_dens.fairchem2.datasets.DeNSAseDBDataset" in result.stdout + result.stderr
    assert not list(tmp_path.glob("t1/checkpoints/*/inference_ckpt.pt"))


def _validation_lines(log: str) -> list[str]:
    return re.findall(r"^\s+val/emt\.val,\w+,\w+: .*$", log, re.MULTILINE)


def test_validate_denoising_reports_denoising_metrics_and_leaves_fairchems_validation_alone(
    direct_run, emt_root, tmp_path
):
    params = "runner.train_eval_unit.dens.denoising_pos_params"
    base = [
        f"data_root={emt_root}",
        "runner.train_eval_unit._target_=recording_unit.RecordingUnit",
        f"+{params}.validate_denoising=True",
    ]
    logs = [
        run_fairchem(
            DIRECT_CONFIG,
            [
                *base,
                f"+job.run_dir={tmp_path}/{name}",
                "+job.timestamp_id=t1",
                f"+runner.train_eval_unit.record_dir={tmp_path}/{name}/records",
            ],
            tmp_path / f"{name}.log",
        )
        for name in ("a", "b")
    ]
    denoising = [
        [ast.literal_eval(m) for m in re.findall(r"^INFO:root:(\{'val/denoising.*\})$", log, re.MULTILINE)]
        for log in logs
    ]
    assert len(denoising[0]) == 2  # one line per validation (2 epochs)
    for line in denoising[0]:
        assert set(line) == {"val/denoising_pos_mae", "val/denoising_energy_mae", "val/denoising_force_mae"}
        assert all(math.isfinite(value) and value > 0 for value in line.values())
    # the corruption comes from validation_seed and the batch index: two runs report the same numbers
    assert denoising[0] == denoising[1]
    # fairchem's own validation still sees the clean batches: its metrics equal the run without the key
    assert _validation_lines(logs[0]) == _validation_lines(direct_run["log"])
    assert _validation_lines(logs[0])  # and there are some


def test_graph_parallelism_is_refused_in_a_real_two_rank_run_saying_why(emt_root, tmp_path):
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("fairchem")),
            "-c",
            str(DIRECT_CONFIG),
            f"data_root={emt_root}",
            f"+job.run_dir={tmp_path}",
            "+job.timestamp_id=t1",
            "+job.scheduler.ranks_per_node=2",
            "+job.graph_parallel_group_size=2",
            "+loader.batch_sampler_fn.min_atoms=2",
        ],
        capture_output=True,
        text=True,
        env=fairchem_env(),
        timeout=240,
    )
    assert result.returncode != 0
    assert (
        "DeNS on fairchem 2 does not support graph parallelism: there each rank embeds only its share of a "
        "structure's atoms"
    ) in result.stdout + result.stderr
    assert not list(tmp_path.glob("t1/checkpoints/*/inference_ckpt.pt"))
