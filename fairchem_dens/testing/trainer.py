"""A fairchem trainer built as fairchem's CLI builds it, and inputs made to fail it.

Inputs: a config variant the command line cannot express, an LMDB whose entries lack a field.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import torch

from fairchem_dens.datasets.lmdb_io import close_lmdb, read_lmdb, write_lmdb

__all__ = ["fairchem_trainer", "write_variant", "lmdb_without", "read_lmdb", "close_lmdb"]


def write_variant(config_yml: str | Path, path: str | Path, edit) -> Path:
    """A copy of a config (``includes:`` resolved as fairchem does) changed by ``edit(config)``.

    For configs the command line cannot express (a removed output, another model).
    """
    import yaml
    from fairchem.core.common.utils import load_config

    config, _, _ = load_config(str(config_yml))
    edit(config)
    path = Path(path)
    path.write_text(yaml.safe_dump(config))
    return path


def lmdb_without(source: str | Path, field: str, folder: str | Path) -> Path:
    """A copy of an LMDB data set whose entries lack ``field`` (bad-input tests)."""
    entries = read_lmdb(source)
    for data in entries:
        delattr(data, field)
    folder = Path(folder)
    folder.mkdir(parents=True)
    write_lmdb(entries, folder / "data.lmdb")
    return folder


@contextlib.contextmanager
def fairchem_trainer(config_yml: str | Path, run_dir: str | Path, *overrides: str, mode: str = "train"):
    """A trainer built by fairchem's own CLI code path (flags, includes, registry).

    Args:
        config_yml: a config file (``includes:`` resolved as fairchem does).
        run_dir: where checkpoints, results and logs go.
        *overrides: ``--key.sub=value`` overrides, exactly as on the command line.
        mode: the ``--mode``.

    Yields:
        fairchem's training context (``.trainer``, ``.task``, ``.config``).
    """
    from fairchem.core.common import distutils
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config, new_trainer_context

    args, override_args = flags.get_parser().parse_known_args(
        [
            "--mode",
            mode,
            "--config-yml",
            str(config_yml),
            "--cpu",
            "--run-dir",
            str(run_dir),
            "--timestamp-id",
            "test",
            *overrides,
        ]
    )
    config = build_config(args, override_args)
    if "RANK" not in os.environ or config.get("world_size", 1) == 1:
        distutils.setup_env_local()  # a single rank; multi-rank callers set RANK etc. themselves
    context = new_trainer_context(config=config)
    ctx = None
    try:
        ctx = context.__enter__()
        yield ctx
    finally:
        # py-lmdb refuses to open a file twice in one process: close what this trainer opened.
        trainer = getattr(ctx, "trainer", None)
        for name in ("train_dataset", "val_dataset", "test_dataset", "relax_dataset"):
            close_lmdb(getattr(trainer, name, None))
        gc.collect()  # datasets of a trainer that failed while being built close on collection
        # fairchem's context tears down torch.distributed only on a clean exit.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
