"""Non-fixture helpers the test files share: fixture paths, CLI overrides, the original DeNS fixtures.

Fixtures stay in conftest.py; a test file imports these with ``from helpers import ...``
(pytest.ini puts tests/ on the path, so the files in unit/, integration/ and system/ all can).
The fairchem-1.10 integration is imported inside the functions that use it: conftest.py
imports this module, and conftest.py is loaded under any fairchem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from fairchem_dens.resources import configs_dir

ROOT = Path(__file__).resolve().parents[1]  # the checkout
DATA = ROOT / "tests" / "data"  # the fixtures: inputs.pt, original_dens/, main_d1ce44f/, ...
CONFIGS = configs_dir()  # the shipped package data (the checkout's configs/ links to it)
QUICKSTART = CONFIGS / "quickstart"


def data_overrides(emt_data) -> list[str]:
    """CLI overrides pointing a config's train/val/test at the ``emt_data`` fixture's LMDBs."""
    return [
        f"--dataset.train.src={emt_data['train']}",
        f"--dataset.val.src={emt_data['val']}",
        f"--dataset.test.src={emt_data['test']}",
    ]


#: CLI overrides shrinking an OC20 EquiformerV2 config to seconds per step on a CPU.
TINY_EQV2_OVERRIDES = [
    "--model.backbone.num_layers=2",
    "--model.backbone.sphere_channels=16",
    "--model.backbone.attn_hidden_channels=16",
    "--model.backbone.num_heads=2",
    "--model.backbone.attn_alpha_channels=8",
    "--model.backbone.attn_value_channels=4",
    "--model.backbone.ffn_hidden_channels=16",
    "--model.backbone.lmax_list=[2]",
    "--model.backbone.mmax_list=[1]",
    "--model.backbone.grid_resolution=8",
    "--model.backbone.edge_channels=16",
    "--model.backbone.num_distance_basis=64",
    "--model.backbone.max_neighbors=12",
    "--model.backbone.max_radius=5.0",
    "--optim.batch_size=6",
    "--optim.num_workers=0",
    "--optim.scheduler_params.warmup_epochs=1",
    "--dataset.train.transforms.normalizer.energy.mean=0.0",
]


# ------------------------------------------------------------ the original DeNS code's fixtures
# (tests/data/original_dens: its checkpoints and reference outputs on the batch of inputs.pt)

ORIGINAL = DATA / "original_dens"
MODELS = ("eqv2_dens", "escn_dens")
MODES = ("s2ef", "dens_full", "dens_partial")


def reference(name):
    return np.load(ORIGINAL / name / "reference_outputs.npz")


def fixture_case(ref, mode):
    from fairchem_dens.testing import batch_from_tensors

    batch = batch_from_tensors(DATA / "inputs.pt")
    if mode != "s2ef":
        batch.pos = torch.tensor(ref[f"{mode}_pos"])
        batch.denoising_pos_forward = True
        if mode == "dens_partial":
            batch.noise_mask = torch.tensor(ref["dens_partial_noise_mask"])
    return batch


def converted_model(path: Path, use_ema: bool = False):
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    from fairchem_dens.models.checkpoints import read_checkpoint
    from fairchem_dens.models.convert_original import convert_original_checkpoint
    from fairchem_dens.testing import build_model

    checkpoint = convert_original_checkpoint(read_checkpoint(path))
    model = build_model(checkpoint["config"]["model"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    if use_ema:
        ema = ExponentialMovingAverage(model.parameters(), 0.999)
        ema.load_state_dict(checkpoint["ema"])
        ema.copy_to()
    return model.eval(), checkpoint


def sphere_sample_scale(model, ref, mode="s2ef"):
    """max |per-sphere-sample value| of an eSCN force head on a fixture case.

    eSCN forces are the mean of these values times unit vectors; where they nearly cancel
    (the fixture's EMA weights: |F| 3e-5 from values of 4e-2) the forces' round-off scales
    with the values, not with |F|.
    """
    from fairchem_dens.testing import forward_seeded

    samples = []
    hook = model.output_heads["forces"].force_block.fc3.register_forward_hook(
        lambda module, args, out: samples.append(float(out.abs().max()))
    )
    with torch.no_grad():
        forward_seeded(model, fixture_case(ref, mode), int(ref["forward_seed"]))
    hook.remove()
    return max(samples)


def fixture_lmdb(folder):
    """The 4 fixture structures as a fairchem LMDB (what the reference outputs were computed on)."""
    from torch_geometric.data import Data

    from fairchem_dens.datasets.lmdb_io import write_lmdb

    tensors = torch.load(DATA / "inputs.pt", weights_only=True)
    starts = [0, *torch.cumsum(tensors["natoms"], 0).tolist()]
    entries = []
    for s, n in enumerate(tensors["natoms"].tolist()):
        atoms = slice(starts[s], starts[s] + n)
        entries.append(
            Data(
                pos=tensors["pos"][atoms],
                cell=tensors["cell"][s : s + 1],
                atomic_numbers=tensors["atomic_numbers"][atoms],
                natoms=n,
                fixed=tensors["fixed"][atoms],
                tags=tensors["tags"][atoms],
                forces=tensors["forces"][atoms],
                energy=float(tensors["energy"][s]),
                sid=int(tensors["sid"][s]),
                fid=int(tensors["fid"][s]),
            )
        )
    # py-lmdb refuses to open one file twice in a process: val and test get a copy each.
    for split in ("val", "test"):
        (folder / split).mkdir(parents=True)
        write_lmdb(entries, folder / split / "data.lmdb")
    return folder, tensors


def config_for(name, data_folder, path):
    """A DeNS trainer config for an original checkpoint, validating and testing on :func:`fixture_lmdb`'s folder."""
    from fairchem_dens.models.checkpoints import checkpoint_family, read_checkpoint
    from fairchem_dens.models.convert_original import original_model_config

    checkpoint = read_checkpoint(ORIGINAL / name / "checkpoint.pt")
    _, family = checkpoint_family(checkpoint)
    kwargs = json.loads((ORIGINAL / name / "model_kwargs.json").read_text())["kwargs"]
    config = {
        "trainer": "fairchem_dens.trainers.dens.DeNSTrainer",
        "model": original_model_config(family, kwargs),
        "dataset": {
            "val": {"format": "lmdb", "src": str(data_folder / "val")},
            "test": {"format": "lmdb", "src": str(data_folder / "test")},
        },
        "outputs": {
            "energy": {"level": "system"},
            "forces": {"level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True},
        },
        "loss_functions": [
            {"energy": {"fn": "mae", "coefficient": 2}},
            {"forces": {"fn": "l2mae", "coefficient": 100}},
        ],
        "evaluation_metrics": {"primary_metric": "forces_mae", "metrics": {"energy": ["mae"], "forces": ["mae"]}},
        "task": {"prediction_dtype": "float32"},
        "logger": "tensorboard",
        "optim": {
            "batch_size": 4,
            "eval_batch_size": 4,
            "num_workers": 0,
            "max_epochs": 1,
            "lr_initial": 1e-4,
            "ema_decay": 0.999,
            "use_denoising_pos": True,
            "scheduler": "LambdaLR",
            "scheduler_params": {
                "lambda_type": "cosine",
                "warmup_factor": 0.2,
                "warmup_epochs": 0.1,
                "lr_min_factor": 0.01,
            },
            "denoising_pos_params": {"prob": 0.5, "fixed_noise_std": True, "std": 0.1, "corrupt_ratio": 0.5},
            "denoising_pos_coefficient": 10,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def emt_md17_frames(formula: str, count: int, std: float, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` frames of ASE's ``formula`` molecule rattled by ``std`` Å, labelled by EMT (which
    knows H, C, N, O): ``z``, ``R`` (Å), ``E`` (eV), ``F`` (eV/Å)."""
    from ase.build import molecule
    from ase.calculators.emt import EMT

    atoms = molecule(formula)
    atoms.calc = EMT()
    positions = atoms.positions + np.random.default_rng(seed).normal(0.0, std, size=(count, len(atoms), 3))
    energies, forces = np.empty(count), np.empty((count, len(atoms), 3))
    for i, pos in enumerate(positions):
        atoms.positions = pos
        energies[i], forces[i] = atoms.get_potential_energy(), atoms.get_forces()
    return {"z": atoms.numbers.astype(np.uint8), "R": positions, "E": energies, "F": forces}


def write_md17_npz(path: Path, frames: dict[str, np.ndarray]) -> Path:
    """``frames`` (eV, eV/Å) as an sGDML MD17 file, in its kcal/mol and kcal/mol/Å."""
    from ase import units

    kcal = units.kcal / units.mol
    np.savez(path, z=frames["z"], R=frames["R"], E=frames["E"] / kcal, F=frames["F"] / kcal)
    return path
