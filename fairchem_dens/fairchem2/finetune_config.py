"""``fairchem-dens finetune-config``: a DeNS fine-tuning config for a fairchem-2 checkpoint and a folder of data.

What fairchem's own ``create_uma_finetune_dataset.py`` does for its fine-tuning template, with DeNS:
given a UMA or eSEN checkpoint in fairchem 2's format (``inference_ckpt.pt``, or a released file)
and training / validation folders of ASE databases (``.aselmdb`` or ``.db``), it fits the
element references and target scales on the training data, builds the DeNS model from the
checkpoint once (a backbone or head that does not fit is refused here, naming it, before
anything is written) and writes one config for ``fairchem -c``::

    fairchem-dens finetune-config --checkpoint uma-s-1p1.pt --train DATA/train --val DATA/val \\
        --head conservative --dataset-name omat --out FT
    fairchem -c FT/finetune.yml +job.run_dir=RUN +job.timestamp_id=ft

The config is the shipped bulk recipe of the chosen head (``bulk_direct.yml`` or
``bulk_conservative.yml``: tasks, loaders, DeNS settings, optimiser) with the model taken from
the checkpoint by :func:`fairchem_dens.fairchem2.finetune.dens_finetuning_model`, a
fine-tuning learning rate, and the stress task dropped where the data has no stress.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.fairchem2.normalizers import fit_normalizers
from fairchem_dens.fairchem2.predict import DATABASE_SUFFIXES, database_files
from fairchem_dens.resources import configs_dir

__all__ = ["DENS_BACKBONES", "HEADS", "finetune_config", "write_finetune_config"]

#: fairchem 2's backbone classes (dotted paths and registry names) with their DeNS twins.
DENS_BACKBONES = {
    "fairchem.core.models.uma.escn_md.eSCNMDBackbone": "fairchem_dens.fairchem2.models.DeNSeSCNMDBackbone",
    "escnmd_backbone": "fairchem_dens.fairchem2.models.DeNSeSCNMDBackbone",
    "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone": "fairchem_dens.fairchem2.models.DeNSeSCNMDMoeBackbone",
    "escnmd_moe_backbone": "fairchem_dens.fairchem2.models.DeNSeSCNMDMoeBackbone",
}
#: Each head choice and its recipe, whose heads and backbone switches the fine-tuning model takes.
HEADS = {"direct": "fairchem2/bulk_direct.yml", "conservative": "fairchem2/bulk_conservative.yml"}
#: The backbone keys that make a model direct or conservative (read from the recipe).
SWITCHES = ("direct_forces", "regress_forces", "regress_stress")
FINETUNE_LR = 4e-4  # fairchem's UMA fine-tuning template's


def _databases(folder: Path, what: str) -> list[str]:
    files = database_files(folder) if folder.is_dir() else []
    if not files:
        raise DeNSSetupError(f"--{what} {folder}: no ASE database ({', '.join(DATABASE_SUFFIXES)}) in that folder")
    return [str(p.resolve()) for p in files]


def _has_stress(files: list[str]) -> bool:
    import ase.db

    with ase.db.connect(files[0]) as database:
        row = next(database.select(limit=1))
    return "stress" in row


def _checkpoint_model(checkpoint: Path) -> tuple[dict, list[str], list[str]]:
    """The checkpoint's backbone config, its data sets and the names of its heads with an energy MLP."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
    backbone = OmegaConf.to_container(OmegaConf.create(stored.model_config["backbone"]), resolve=True)
    model = backbone.get("model")
    dens_twins = set(DENS_BACKBONES.values())
    if model not in DENS_BACKBONES and model not in dens_twins:
        raise DeNSSetupError(
            f"{checkpoint}: its backbone is {model}, which has no DeNS twin; DeNS fine-tuning on fairchem 2 "
            f"takes the eSCN-MD family (eSEN, UMA): {', '.join(DENS_BACKBONES)}"
        )
    energy_heads = sorted(
        {
            key.split(".")[1]
            for key in stored.model_state_dict
            if key.startswith("output_heads.") and key.split(".")[2] == "energy_block"
        }
    )
    return backbone, list(backbone.get("dataset_list") or []), energy_heads


def finetune_config(
    checkpoint: str | Path,
    train: str | Path,
    val: str | Path,
    *,
    head: str,
    dataset_name: str | None = None,
    max_epochs: int = 12,
) -> dict[str, Any]:
    """The fine-tuning config as a plain dict, after the model was built from the checkpoint once.

    Raises:
        DeNSSetupError: an unusable checkpoint, head choice, dataset name or data folder, naming it.
    """
    if head not in HEADS:
        raise DeNSSetupError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_file():
        raise DeNSSetupError(f"--checkpoint {checkpoint}: no such file")
    backbone, datasets, energy_heads = _checkpoint_model(checkpoint)
    dataset_name = dataset_name or (datasets[0] if len(datasets) == 1 else None)
    if dataset_name is None or (datasets and dataset_name not in datasets):
        raise DeNSSetupError(
            f"--dataset-name {dataset_name!r}: the checkpoint's model knows the data sets {datasets}; name the one "
            "whose embedding (and, for UMA, experts) the fine-tuning data should use"
        )
    train_files, val_files = _databases(Path(train), "train"), _databases(Path(val), "val")
    config = OmegaConf.to_container(OmegaConf.load(configs_dir() / HEADS[head]), resolve=False)
    unit = config["runner"]["train_eval_unit"]
    recipe_model = unit["model"]
    switches = {key: recipe_model["backbone"][key] for key in SWITCHES}
    heads = dict(recipe_model["heads"])
    if len(energy_heads) == 1:
        # the head with the energy MLP takes the checkpoint's name for it, so its weights carry over
        mlp = next(name for name, spec in heads.items() if "Energy" in spec["module"] or "EFS" in spec["module"])
        heads = {energy_heads[0] if name == mlp else name: spec for name, spec in heads.items()}
    model = {
        "_target_": "fairchem_dens.fairchem2.finetune.dens_finetuning_model",
        "checkpoint_location": str(checkpoint),
        "backbone": {"model": DENS_BACKBONES.get(backbone["model"], backbone["model"]), "otf_graph": True, **switches},
        "heads": heads,
    }
    if "pass_through_head_outputs" in recipe_model:
        model["pass_through_head_outputs"] = recipe_model["pass_through_head_outputs"]
    if not _has_stress(train_files):
        config["tasks"] = [task for task in config["tasks"] if task["name"] != "stress"]
        config["dataset"]["a2g_args"]["r_stress"] = False
        model["heads"] = {name: spec for name, spec in model["heads"].items() if "Stress" not in spec["module"]}
        model["backbone"]["regress_stress"] = False
    # built once here, so a checkpoint that does not fit is refused before anything is written
    from fairchem_dens.fairchem2.finetune import dens_finetuning_model

    dens_finetuning_model(**{k: v for k, v in model.items() if k != "_target_"})
    fitted = fit_normalizers(Path(train_files[0]).parent)
    unit["model"] = model
    unit["optimizer_fn"]["lr"] = FINETUNE_LR
    config.update(fitted)
    config.update(dataset_name=dataset_name, max_epochs=max_epochs)
    config.pop("data_root")  # the splits name their files; fairchem refuses a key nothing reads
    runner = config["runner"]
    for loader, split, files in (("train_dataloader", "train", train_files), ("eval_dataloader", "val", val_files)):
        (recipe_dataset,) = runner[loader]["dataset"]["dataset_configs"].values()
        runner[loader]["dataset"]["dataset_configs"] = {
            dataset_name: {**recipe_dataset, "splits": {split: {"src": files}}}
        }
    for task in config["tasks"]:
        task["datasets"] = [dataset_name]
    return config


def write_finetune_config(out: str | Path, **arguments: Any) -> Path:
    """Writes ``out/finetune.yml`` (refused if it exists) and returns its path."""
    path = Path(out) / "finetune.yml"
    if path.exists():
        raise DeNSSetupError(f"{path} exists: choose another --out or move it away")
    config = finetune_config(**arguments)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# DeNS fine-tuning of {arguments['checkpoint']} ({arguments['head']} heads), written by "
        "`fairchem-dens finetune-config`.\n#   fairchem -c finetune.yml +job.run_dir=RUN +job.timestamp_id=ft\n"
        "# Plain fine-tuning: runner.train_eval_unit.dens.use_denoising_pos=False.\n"
    )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(config)))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairchem-dens finetune-config", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a fairchem-2 checkpoint (inference_ckpt.pt, UMA/eSEN)")
    parser.add_argument("--train", required=True, help="folder of the training ASE databases (.aselmdb / .db)")
    parser.add_argument("--val", required=True, help="folder of the validation ASE databases")
    parser.add_argument("--head", choices=tuple(HEADS), default="conservative")
    parser.add_argument(
        "--dataset-name",
        default=None,
        help="which of the model's data sets the data is (UMA: omat, omol, oc20, odac, omc)",
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", required=True, help="folder for finetune.yml")
    args = parser.parse_args(argv)
    try:
        path = write_finetune_config(
            args.out,
            checkpoint=args.checkpoint,
            train=args.train,
            val=args.val,
            head=args.head,
            dataset_name=args.dataset_name,
            max_epochs=args.epochs,
        )
    except DeNSSetupError as error:
        raise SystemExit(f"finetune-config: {error}") from error
    print(f"{path}\nfairchem -c {path} +job.run_dir=RUN +job.timestamp_id=ft")
    return 0
