"""`fairchem-dens finetune-config`: a DeNS fine-tuning config for a fairchem-2 checkpoint and folders of data,
trained through `fairchem -c`; checkpoints and data that do not fit are refused before anything is written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import yaml

from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.fairchem2.finetune import dens_finetuning_model

from fc2_helpers import DENS_FORCE_HEAD, DENS_MOE, build, model_config, run_fairchem, uma_shaped, write_checkpoint


def finetune_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairchem_dens.cli", "finetune-config", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("head", ["conservative", "direct"])
def test_a_written_config_fine_tunes_a_pretrained_checkpoint_with_dens_through_fairchem(
    direct_run, emt_root, tmp_path, head
):
    checkpoint = direct_run["dir"] / "checkpoints" / "final" / "inference_ckpt.pt"
    result = finetune_config(
        "--checkpoint",
        str(checkpoint),
        "--train",
        str(emt_root / "train"),
        "--val",
        str(emt_root / "val"),
        "--head",
        head,
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "finetune.yml").read_text())
    assert config["runner"]["train_eval_unit"]["model"]["checkpoint_location"] == str(checkpoint)
    assert config["dataset_name"] == "emt" and len(config["elem_refs"]) == 100
    assert {task["name"] for task in config["tasks"]} == {"energy", "forces", "stress"}  # the data has stress
    log = run_fairchem(
        tmp_path / "finetune.yml",
        [
            f"+job.run_dir={tmp_path}/run",
            "+job.timestamp_id=ft",
            "runner.train_eval_unit.dens.denoising_pos_params.prob=1.0",
        ],
        tmp_path / "fairchem.log",
    )
    # the pretrained energy MLP carried over (the direct run names its head `energy`), and for direct
    # fine-tuning the force head too
    kept = {"conservative": "['energy']", "direct": "['energy', 'forces']"}[head]
    assert f"pretrained weights kept in heads {kept}" in log
    assert re.search(r"DeNS epoch 1: corrupted [1-9]\d*/", log)
    assert (tmp_path / "run" / "ft" / "checkpoints" / "final" / "inference_ckpt.pt").is_file()


def test_a_uma_checkpoint_needs_one_of_its_data_sets_and_bad_input_writes_nothing(emt_root, tmp_path):
    _, uma = uma_shaped(tmp_path)
    common = [
        "--checkpoint",
        uma,
        "--train",
        str(emt_root / "train"),
        "--val",
        str(emt_root / "val"),
        "--out",
        str(tmp_path / "out"),
    ]
    result = finetune_config(*common, "--dataset-name", "omat")
    assert (
        result.returncode != 0
        and "--dataset-name 'omat': the checkpoint's model knows the data sets ['emt']" in result.stderr
    )
    result = finetune_config(*common[:4], "--val", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and f"--val {tmp_path}: no ASE database" in result.stderr
    assert not (tmp_path / "out").exists()
    assert finetune_config(*common, "--head", "direct").returncode == 0
    result = finetune_config(*common, "--head", "direct")  # a second time: the file is there
    assert result.returncode != 0 and "finetune.yml exists" in result.stderr


def test_a_checkpoint_of_a_backbone_without_a_dens_twin_is_refused_naming_it(emt_root, tmp_path):
    """fairchem 2 also ships EScAIP / AllScAIP backbones; DeNS is built for the eSCN-MD family (eSEN, UMA)."""
    path = write_checkpoint(build(dens=False), model_config(dens=False), tmp_path / "escaip.pt")
    stored = torch.load(path, weights_only=False)
    stored.model_config["backbone"]["model"] = "EScAIP_backbone"
    torch.save(stored, path)
    result = finetune_config(
        "--checkpoint",
        path,
        "--train",
        str(emt_root / "train"),
        "--val",
        str(emt_root / "val"),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode != 0 and "its backbone is EScAIP_backbone, which has no DeNS twin" in result.stderr
    assert not (tmp_path / "out").exists()


def test_heads_that_do_not_fit_the_checkpoints_heads_of_the_same_name_are_refused_naming_them(tmp_path):
    """UMA's released heads are fairchem's DatasetSpecificMoEWrapper, one expert per data set: a head of that
    name with another list of data sets holds weights of other shapes."""
    _, path = uma_shaped(tmp_path)
    wrapper = {
        "module": "fairchem.core.models.uma.escn_moe.DatasetSpecificMoEWrapper",
        "head_cls": "fairchem.core.models.uma.escn_md.MLP_Energy_Head",
        "head_kwargs": {"wrap_property": False},
    }
    stored = torch.load(path, weights_only=False)
    pretrained = dens_finetuning_model(
        path,
        heads={"energy": {**wrapper, "dataset_names": ["emt", "omat"]}, "forces": DENS_FORCE_HEAD},
        backbone={"model": DENS_MOE, "otf_graph": True},
    )
    stored.model_state_dict = {
        k: v for k, v in pretrained.state_dict().items() if not k.startswith("backbone.force_embedding")
    }
    stored.model_config["heads"] = {"energy": {**wrapper, "dataset_names": ["emt", "omat"]}}
    torch.save(stored, tmp_path / "uma_two_heads.pt")
    with pytest.raises(DeNSSetupError, match=r"the new model's head\(s\) energy do not fit the heads of the same name"):
        dens_finetuning_model(
            str(tmp_path / "uma_two_heads.pt"),
            heads={"energy": {**wrapper, "dataset_names": ["emt"]}, "forces": DENS_FORCE_HEAD},
            backbone={"model": DENS_MOE, "otf_graph": True},
        )
