"""``fairchem-dens``: helper commands around fairchem's own ``fairchem`` CLI.

Training, validation, prediction and relaxations go through ``fairchem --mode ...``
with a DeNS config; these commands cover what fairchem has no command for.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path


def _quickstart(args: argparse.Namespace) -> int:
    from fairchem_dens.quickstart import run_quickstart

    try:
        run_quickstart(
            Path(args.workdir), epochs=args.epochs, n_train=args.frames, seeds=tuple(args.seeds), jobs=args.jobs
        )
    except ValueError as error:
        print(f"fairchem-dens quickstart: {error}", file=sys.stderr)
        return 2
    return 0


def _quickstart2(args: argparse.Namespace) -> int:
    from fairchem_dens.fairchem2.quickstart import run_quickstart2

    try:
        run_quickstart2(Path(args.workdir), head=args.head, seeds=tuple(args.seeds), epochs=args.epochs, jobs=args.jobs)
    except ValueError as error:
        print(f"fairchem-dens quickstart2: {error}", file=sys.stderr)
        return 2
    return 0


def _configs(args: argparse.Namespace) -> int:
    from fairchem_dens.resources import configs_dir, copy_configs

    if args.copy is None:
        print(configs_dir())
        return 0
    try:
        target = copy_configs(Path(args.copy), overwrite=args.overwrite)
    except FileExistsError as error:
        raise SystemExit(f"configs: {error}") from error
    print(
        f"copied the shipped configs to {target}; e.g. fairchem --mode train --config-yml "
        f"{target / 'quickstart' / 'eqv2_dens_tiny.yml'} --cpu"
    )
    return 0


def _make_emt_data(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise SystemExit(f"make-emt-data: {out} exists and is not empty; pass --overwrite to replace its data")
    if args.bulk:
        from fairchem_dens.datasets.emt_bulk import LAYOUTS, generate_bulk_dataset

        try:
            layouts = generate_bulk_dataset(
                out,
                families_per_metal=args.families,
                md_frames=args.md_frames,
                seed=args.seed,
                layouts=tuple(args.layout or LAYOUTS),
            )
        except ValueError as error:
            raise SystemExit(f"make-emt-data: {error}") from error
        for layout, folders in layouts.items():
            for split, folder in folders.items():
                print(f"{layout} {split}: {folder}")
        return 0
    from fairchem_dens.datasets.emt_data import generate_emt_dataset

    folders = generate_emt_dataset(out, n_systems=args.systems, seed=args.seed, holdout_adsorbate=args.holdout)
    for split, folder in folders.items():
        print(f"{split}: {folder}")
    return 0


def _convert_checkpoint(args: argparse.Namespace) -> int:
    from fairchem_dens.models.checkpoints import read_checkpoint
    from fairchem_dens.models.convert_original import convert_original_checkpoint

    converted, target = _convert_file(
        args,
        "convert-checkpoint",
        "the original is kept",
        lambda source: convert_original_checkpoint(read_checkpoint(source, allow_pickle=args.allow_pickle)),
    )
    backbone = converted["config"]["model"]["backbone"]["model"]
    print(f"wrote {target}: {len(converted['state_dict'])} tensors, backbone {backbone}")
    return 0


def _to_conservative(args: argparse.Namespace) -> int:
    from fairchem_dens.models.checkpoints import read_checkpoint
    from fairchem_dens.models.to_conservative import conservative_finetune_checkpoint

    converted, target = _convert_file(
        args,
        "to-conservative",
        "the direct checkpoint is kept",
        lambda source: conservative_finetune_checkpoint(read_checkpoint(source), use_ema=not args.no_ema),
    )
    print(
        f"wrote {target}: fairchem eSEN_Backbone + MLP_EFS_Head, {len(converted['state_dict'])} tensors "
        f"({'EMA' if converted['config']['converted_from']['ema'] else 'raw'} weights); fine-tune with "
        f"`fairchem --mode train --config-yml CONSERVATIVE.yml --checkpoint {target}`"
    )
    return 0


def _convert_file(args: argparse.Namespace, command: str, kept: str, convert) -> tuple[dict, Path]:
    """``convert(IN)`` written to OUT; refuses OUT = IN and, without --overwrite, an existing OUT."""
    import torch

    from fairchem_dens.files import atomic_write
    from fairchem_dens.models.checkpoints import CheckpointMismatchError

    source, target = Path(args.input).resolve(), Path(args.output).resolve()
    if source == target:
        raise SystemExit(f"{command}: OUT must differ from IN ({kept})")
    if target.exists() and not args.overwrite:
        raise SystemExit(f"{command}: {target} exists; pass --overwrite to replace it")
    try:
        converted = convert(source)
    except (CheckpointMismatchError, FileNotFoundError) as error:
        raise SystemExit(f"{command}: {error}") from error
    with atomic_write(target) as temp:  # never leaves a half-written OUT behind
        torch.save(converted, temp)
    return converted, target


def _write_metadata(args: argparse.Namespace) -> int:
    from fairchem_dens.datasets.metadata import MetadataError, write_dataset_metadata

    try:
        path, natoms, dataset_format = write_dataset_metadata(
            args.src, dataset_format=args.format, pattern=args.pattern, overwrite=args.overwrite
        )
    except MetadataError as error:
        raise SystemExit(f"write-metadata: {error}") from error
    print(f"wrote {path}: {len(natoms)} entries, {int(natoms.sum())} atoms (read as {dataset_format})")
    return 0


def _fit_element_references(args: argparse.Namespace) -> int:
    from fairchem_dens.datasets.references import fit_element_references

    path = fit_element_references(
        args.train,
        Path(args.output),
        dataset_format=args.format,
        batch_size=args.batch_size,
        num_batches=args.num_batches,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}; use it as dataset.train.transforms.element_references.energy.file")
    return 0


def _make_submission(args: argparse.Namespace) -> int:
    from fairchem_dens.submission import SubmissionError, build_submission

    # Pass every split given: missing or unexpected splits are reported by the builder.
    splits = {s: getattr(args, s) for s in ("id", "ood_ads", "ood_cat", "ood_both", "ood") if getattr(args, s)}
    try:
        path = build_submission(
            args.task,
            args.dataset,
            splits,
            args.out,
            checkpoint=args.checkpoint,
            config=args.config,
            allow_total_energy=args.allow_total_energy,
            strict_counts=args.strict_counts,
            overwrite=args.overwrite,
        )
    except SubmissionError as error:
        raise SystemExit(f"make-submission: {error}") from error
    print(f"wrote {path} and {path}.json")
    return 0


def _md17_to_lmdb(args: argparse.Namespace) -> int:
    from fairchem_dens.datasets.md17 import MD17FormatError, convert_md17
    from fairchem_dens.versions import FairchemVersionError

    try:
        folders = convert_md17(
            Path(args.input),
            Path(args.out),
            n_train=args.train,
            n_val=args.val,
            seed=args.seed,
            molecule=args.molecule,
            overwrite=args.overwrite,
            aselmdb=args.aselmdb,
        )
    except (MD17FormatError, FileExistsError, FileNotFoundError, FairchemVersionError) as error:
        raise SystemExit(f"md17-to-lmdb: {error}") from error
    for split, folder in folders.items():
        print(f"{split}: {folder}")
    print(f"info: {Path(args.out) / 'md17_info.json'} (units, checksum, split, training-set statistics)")
    return 0


def _make_xtb_md17(argv: list[str]) -> int:
    import subprocess

    from fairchem_dens.datasets.xtb_md17 import build_parser as xtb_parser

    xtb_parser().parse_args(argv)  # --help and bad arguments are answered here, without tblite
    # tblite's wheel links the system libgomp, and torch (imported by this package) loads an older
    # libgomp under the same soname; so the labelling runs in a fresh interpreter that loads tblite first.
    code = "import tblite.ase; from fairchem_dens.datasets.xtb_md17 import main; raise SystemExit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv]).returncode


#: The fairchem-2 commands with a parser of their own: name -> (module with ``main(argv)``, help).
OWN_PARSERS = {
    "predict-s2ef": (
        "fairchem_dens.fairchem2.predict",
        "fairchem 2: S2EF predictions of an inference checkpoint on an ASE database, in the file "
        "layout make-submission reads (CHECKPOINT SRC --out FILE --task-name TASK)",
    ),
    "fit-normalizers": (
        "fairchem_dens.fairchem2.normalizers",
        "fairchem 2: the element references and target scale of a training split, printed as "
        "the overrides the bulk recipes take (SPLIT)",
    ),
    "finetune-config": (
        "fairchem_dens.fairchem2.finetune_config",
        "fairchem 2: write a DeNS fine-tuning config for a UMA / eSEN checkpoint and folders of ASE "
        "databases (--checkpoint CKPT --train DIR --val DIR --head direct|conservative "
        "[--dataset-name N] --out DIR)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairchem-dens", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser(
        "quickstart",
        help="train a small conservative eSEN with and without DeNS (the paper's MD17 settings) on the built-in "
        "GFN2-xTB ethanol data and compare",
    )
    quick.add_argument("--workdir", default="quickstart_output", help="output folder (default: %(default)s)")
    quick.add_argument("--epochs", type=int, default=10, help="training epochs (default: %(default)s)")
    quick.add_argument("--frames", type=int, default=950, help="training frames (default and at most: %(default)s)")
    quick.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    quick.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on 2+ cores)")
    quick.set_defaults(func=_quickstart)

    quick2 = commands.add_parser(
        "quickstart2",
        help="fairchem 2: train an eSCN-MD with and without DeNS on EMT bulk metals (energy, forces, stress) "
        "through `fairchem -c` and compare",
    )
    quick2.add_argument("--workdir", default="quickstart2_output", help="output folder (default: %(default)s)")
    quick2.add_argument(
        "--head",
        choices=("direct", "conservative"),
        default="direct",
        help="bulk_direct.yml or bulk_conservative.yml (default: %(default)s)",
    )
    quick2.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    quick2.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    quick2.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on 2+ cores)")
    quick2.set_defaults(func=_quickstart2)

    configs = commands.add_parser(
        "configs", help="print where the shipped configs are, or copy them (--copy DIR) to run or edit them"
    )
    configs.add_argument(
        "--copy",
        metavar="DIR",
        default=None,
        help="copy the configs tree to DIR (e.g. `--copy configs` for the documented commands)",
    )
    configs.add_argument("--overwrite", action="store_true", help="with --copy: replace configs already in DIR")
    configs.set_defaults(func=_configs)

    emt = commands.add_parser(
        "make-emt-data", help="write the EMT example data (OC20-like slabs, or --bulk) as fairchem datasets"
    )
    emt.add_argument("out", help="output folder (one sub-folder per split)")
    emt.add_argument("--systems", type=int, default=24)
    emt.add_argument("--seed", type=int, default=0)
    emt.add_argument("--holdout", default="OH", help="adsorbate kept out of training for an 'ood' split")
    emt.add_argument(
        "--bulk",
        action="store_true",
        help="bulk fcc metals with energy, forces and stress instead (aselmdb/ and lmdb/ layouts)",
    )
    emt.add_argument("--families", type=int, default=6, help="--bulk: strained supercells per metal")
    emt.add_argument("--md-frames", type=int, default=4, help="--bulk: MD frames per supercell")
    emt.add_argument(
        "--layout",
        action="append",
        choices=("aselmdb", "lmdb"),
        default=None,
        help="--bulk: write only this layout (repeatable; default both; lmdb needs fairchem 1.x)",
    )
    emt.add_argument("--overwrite", action="store_true", help="replace the data set in a non-empty OUT")
    emt.set_defaults(func=_make_emt_data)
    convert = commands.add_parser(
        "convert-checkpoint",
        help="turn a checkpoint of the original DeNS code (equiformer_v2_dens / escn_dens) into a fairchem 1.10 one",
    )
    convert.add_argument("input", help="checkpoint written by the original implementation")
    convert.add_argument("output", help="where to write the converted checkpoint")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read files that torch.load(weights_only=True) refuses (trusted files only)",
    )
    convert.set_defaults(func=_convert_checkpoint)
    conservative = commands.add_parser(
        "to-conservative",
        help="two-step eSEN recipe: a direct DeNS eSEN checkpoint as fairchem's conservative eSEN "
        "(backbone + energy head kept) to fine-tune without DeNS",
    )
    conservative.add_argument("input", help="checkpoint of the direct DeNS pre-training (fairchem_dens.models.esen)")
    conservative.add_argument("output", help="checkpoint to start the conservative fine-tuning from")
    conservative.add_argument("--no-ema", action="store_true", help="take the raw weights, not the EMA's")
    conservative.add_argument("--overwrite", action="store_true")
    conservative.set_defaults(func=_to_conservative)
    meta = commands.add_parser(
        "write-metadata",
        help="write the metadata.npz (atoms per entry) that fairchem's load balancing (optim.load_balancing: "
        "atoms, in every shipped config) needs, for extxyz folders, ASE databases or LMDBs made elsewhere",
    )
    meta.add_argument("src", help="the dataset's src as the config gives it: a folder, or one .db/.aselmdb/.lmdb file")
    meta.add_argument(
        "--format",
        default=None,
        help="the config's dataset format (default: from the file names: ase_read_multi for "
        ".extxyz/.xyz/.traj, the ASE-database reader for .db/.aselmdb, lmdb for .lmdb)",
    )
    meta.add_argument(
        "--pattern", default=None, help="ase_read_multi: the config's pattern (default: *.SUFFIX of the files found)"
    )
    meta.add_argument("--overwrite", action="store_true", help="replace an existing metadata.npz")
    meta.set_defaults(func=_write_metadata)
    refs = commands.add_parser(
        "fit-element-references",
        help="fit linear per-element energy references on a training set (for OC22 total energies)",
    )
    refs.add_argument("train", help="training LMDB folder or file")
    refs.add_argument("output", help="the .npz to write (key `element_references`)")
    refs.add_argument("--format", default="oc22_lmdb", help="fairchem dataset format (default: %(default)s)")
    refs.add_argument("--batch-size", type=int, default=64)
    refs.add_argument("--num-batches", type=int, default=None, help="default: the whole set")
    refs.add_argument("--overwrite", action="store_true")
    refs.set_defaults(func=_fit_element_references)
    sub = commands.add_parser(
        "make-submission",
        help="validate per-split prediction files and merge them into one OC20/OC22 leaderboard .npz",
    )
    sub.add_argument("task", choices=["s2ef", "is2re", "is2rs", "is2re-relaxations"])
    sub.add_argument("--dataset", choices=["oc20", "oc22"], default="oc20")
    for split in ("id", "ood-ads", "ood-cat", "ood-both", "ood"):
        sub.add_argument(f"--{split}", help=f"predictions of the {split} split (.npz, or a folder of .traj)")
    sub.add_argument("--out", required=True, help="the submission .npz to write")
    sub.add_argument("--checkpoint", help="checkpoint that made the predictions (hashed into the sidecar JSON)")
    sub.add_argument("--config", help="config of the run (checked for total-energy training, kept in the sidecar)")
    sub.add_argument("--allow-total-energy", action="store_true", help="accept an OC20 submission of total energies")
    sub.add_argument("--strict-counts", action="store_true", help="split sizes must match the OC20 test sets")
    sub.add_argument("--overwrite", action="store_true")
    sub.set_defaults(func=_make_submission)
    md17 = commands.add_parser(
        "md17-to-lmdb", help="convert an MD17 / rMD17 .npz (kcal/mol) into fairchem LMDBs in eV with the 950/50 split"
    )
    md17.add_argument("input", help="sGDML MD17 (z, R, E, F) or rMD17 (nuclear_charges, coords, energies, forces) .npz")
    md17.add_argument("out", help="output folder (train/, val/, test/, splits.npz, md17_info.json)")
    md17.add_argument("--train", type=int, default=950)
    md17.add_argument("--val", type=int, default=50)
    md17.add_argument("--seed", type=int, default=1, help="numpy default_rng seed of the split (default: %(default)s)")
    md17.add_argument("--molecule", default=None)
    md17.add_argument("--overwrite", action="store_true")
    md17.add_argument(
        "--aselmdb",
        action="store_true",
        help="write each split as data.aselmdb (fairchem 2's ase_db format) instead of fairchem 1 LMDBs",
    )
    md17.set_defaults(func=_md17_to_lmdb)
    xtb = commands.add_parser(
        "make-xtb-md17",
        add_help=False,
        help="GFN2-xTB (tblite) Langevin MD of a small molecule, written as an MD17 (sGDML) .npz "
        "(MOLECULE OUT [--frames N] [--temperature K] [--stride S] [--seed N] [--overwrite])",
    )
    xtb.add_argument("xtb_argv", nargs=argparse.REMAINDER)
    sub = commands.add_parser(
        "submit",
        add_help=False,
        help="submit to SLURM as fairchem --submit does, CPU jobs included (never runs here): "
        "fairchem-dens submit --mode train --config-yml CFG [--cpu] [--num-gpus N] [--slurm-*]",
    )
    sub.add_argument("fairchem_args", nargs=argparse.REMAINDER)
    for name, (_, usage) in OWN_PARSERS.items():
        commands.add_parser(name, add_help=False, help=usage).add_argument("own_argv", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["submit"]:  # fairchem's own parser must see the raw arguments
        from fairchem_dens.slurm import main as submit_main

        return submit_main(argv[1:])
    if argv[:1] == ["make-xtb-md17"]:  # its own parser (argparse.REMAINDER would reject a leading --option)
        return _make_xtb_md17(argv[1:])
    if argv[:1] and argv[0] in OWN_PARSERS:
        module, _ = OWN_PARSERS[argv[0]]
        return importlib.import_module(module).main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
