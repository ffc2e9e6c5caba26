"""Shared helpers of the fairchem-2 tests: the shipped configs, CLI runs, tiny models and batches.

Test modules import them with ``from fc2_helpers import ...`` (pytest puts this folder on sys.path);
fixtures stay in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch
from fairchem.core.models.base import HydraModel
from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint
from omegaconf import OmegaConf

from fairchem_dens.core.batch import corrupt_batch
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.fairchem2.emt_data import emt_structures
from fairchem_dens.fairchem2.models import ENCODED_FORCES
from fairchem_dens.resources import configs_dir

HERE = Path(__file__).parent
FAIRCHEM = Path(sys.executable).with_name("fairchem")
DIRECT_CONFIG = configs_dir() / "fairchem2" / "dens_escnmd_direct.yml"
FINETUNE_CONFIG = configs_dir() / "fairchem2" / "dens_escnmd_conservative_finetune.yml"
UMA_CONFIG = configs_dir() / "fairchem2" / "dens_uma_finetune.yml"
MD17_CONFIG = configs_dir() / "fairchem2" / "dens_md17_conservative.yml"


def fairchem_env() -> dict[str, str]:
    """Environment of a CLI subprocess: this folder importable (recording_unit), one thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_fairchem(config: Path, overrides: list[str], log: Path, timeout: int = 240) -> str:
    """``fairchem -c config overrides...`` in a subprocess; returns its log, fails the test on a non-zero exit."""
    with open(log, "w") as out:
        result = subprocess.run(
            [str(FAIRCHEM), "-c", str(config), *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=fairchem_env(),
            timeout=timeout,
        )
    text = log.read_text()
    assert result.returncode == 0, f"fairchem exited with {result.returncode}:\n{text[-4000:]}"
    return text


PLAIN_BACKBONE = "fairchem.core.models.uma.escn_md.eSCNMDBackbone"
PLAIN_FORCE_HEAD = "fairchem.core.models.uma.escn_md.Linear_Force_Head"
PLAIN_HEADS = {
    "fairchem_dens.fairchem2.models.DeNSLinearForceHead": PLAIN_FORCE_HEAD,
    "fairchem_dens.fairchem2.models.DeNSMLPEFSHead": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
}


def model_config(dens: bool, conservative: bool = False, noise_head: str | None = None) -> dict:
    """The shipped direct config's model (or its conservative twin, the fine-tuning config's
    backbone switches and head), with DeNS classes or fairchem's plain ones; ``noise_head``
    sets the DeNS head's noise head (None: the config's default, linear)."""
    config = OmegaConf.to_container(OmegaConf.load(DIRECT_CONFIG), resolve=True)["runner"]["train_eval_unit"]["model"]
    if conservative:
        config["backbone"].update(direct_forces=False, regress_stress=True)
        config["heads"] = {"energy": {"module": "fairchem_dens.fairchem2.models.DeNSMLPEFSHead"}}
        config["pass_through_head_outputs"] = True
    if noise_head is not None:
        for head in config["heads"].values():
            if head["module"] in PLAIN_HEADS:
                head["noise_head"] = noise_head
    if not dens:
        config["backbone"]["model"] = PLAIN_BACKBONE
        for head in config["heads"].values():
            head["module"] = PLAIN_HEADS.get(head["module"], head["module"])
    return config


def build(
    dens: bool,
    seed: int = 0,
    conservative: bool = False,
    noise_head: str | None = None,
    encoding_scale: float | None = None,
) -> HydraModel:
    config = model_config(dens, conservative, noise_head)
    config.pop("_target_")
    if encoding_scale is not None:
        config["backbone"]["force_encoding_scale"] = encoding_scale
    torch.manual_seed(seed)
    return HydraModel(**config)


def run(model, data):
    """A forward with the global RNG seeded: eSCN-MD draws a random vector per edge to fix each
    edge's rotation frame (outputs depend on it only through round-off), so equal runs need equal draws."""
    torch.manual_seed(0)
    return model(data)


def batch(count: int = 4, seed: int = 5) -> AtomicData:
    items = []
    for atoms in emt_structures(count, seed):
        data = AtomicData.from_ase(atoms, task_name="emt")
        data.dataset = "emt"
        data.dataset_name = "emt.train"  # what fairchem's concat dataset sets (loss masks read it)
        data.stress = data.stress.reshape(1, 9)  # fairchem's stress_reshape_transform
        items.append(data)
    return atomicdata_list_to_batch(items)


def dens_batch(corrupt_ratio: float | None = 0.5, step: int = 0) -> AtomicData:
    config = DeNSConfig.from_optim(
        {
            "use_denoising_pos": True,
            "denoising_pos_coefficient": 5,
            "denoising_pos_params": {"prob": 1.0, "fixed_noise_std": True, "std": 0.05, "corrupt_ratio": corrupt_ratio},
        }
    )
    data = batch()
    assert corrupt_batch(config, data, seed=0, step=step)
    data[ENCODED_FORCES] = data.forces.clone()  # what the unit stores (one force task here)
    return data


def outputs(out: dict) -> dict:
    """{name: tensor} of a HydraModel output (per-head dicts or pass-through)."""
    return {k: v[k] for k, v in out.items() if k in ("energy", "forces", "stress")}


MOE = "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone"
DENS_MOE = "fairchem_dens.fairchem2.models.DeNSeSCNMDMoeBackbone"
DENS_FORCE_HEAD = {"module": "fairchem_dens.fairchem2.models.DeNSLinearForceHead"}


def write_checkpoint(model: HydraModel, config: dict, path) -> str:
    ema = torch.optim.swa_utils.AveragedModel(model)
    torch.save(
        MLIPInferenceCheckpoint(
            model_config=config, model_state_dict=model.state_dict(), ema_state_dict=ema.state_dict(), tasks_config=[]
        ),
        path,
    )
    return str(path)


def uma_shaped(tmp_path) -> tuple[HydraModel, str]:
    """A plain UMA-shaped model (2 experts, a model_id as released UMA files carry) and its checkpoint."""
    config = model_config(dens=False)
    config["model_id"] = "tiny-test-uma"
    config["backbone"].update(model=MOE, num_experts=2, use_composition_embedding=True)
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    torch.manual_seed(0)
    plain = HydraModel(**kwargs)
    return plain, write_checkpoint(plain, config, tmp_path / "uma.pt")
