"""DeNS step time / plain step time on fairchem 2 (eSCN-MD, direct and conservative).

One training step's model work, forward + fairchem's ``compute_loss`` + backward, on a
batch of EMT bulk cells: the plain model (fairchem's classes) on the corrupted positions
(the noise changes the graph, so the clean batch would not compare) against the DeNS
model on the DeNS batch, which also pays for ``core.corrupt_batch`` (run each step on a
fresh copy), with the linear noise head and with the block one (``noise_head: block``). The
models share their weights. Runs are interleaved; prints medians, DeNS / plain and block /
linear (and, on CUDA, the peak memory of one step of each).

    /root/.cache/fairchem-dens/fc2/bin/python benchmarks/fairchem2_step_time.py --repeats 20
    python benchmarks/fairchem2_step_time.py --device cuda --channels 128 --structures 32
"""

from __future__ import annotations

import argparse
import copy

import hydra
from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch
from fairchem.core.models.base import HydraModel
from fairchem.core.units.mlip_unit.mlip_unit import compute_loss
from omegaconf import OmegaConf
from timing import cuda_peaks, interleaved_medians

from fairchem_dens.core.batch import corrupt_batch
from fairchem_dens.core.roles import EXCLUDED, ORIGINAL, REPLACED
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.fairchem2.emt_data import emt_structures
from fairchem_dens.fairchem2.loss import DeNSStep, DeNSTaskLoss
from fairchem_dens.fairchem2.models import ENCODED_FORCES
from fairchem_dens.resources import configs_dir

CONFIG = configs_dir() / "fairchem2" / "dens_escnmd_conservative_finetune.yml"
DIRECT = configs_dir() / "fairchem2" / "dens_escnmd_direct.yml"
PLAIN = {
    "fairchem_dens.fairchem2.models.DeNSeSCNMDBackbone": "fairchem.core.models.uma.escn_md.eSCNMDBackbone",
    "fairchem_dens.fairchem2.models.DeNSLinearForceHead": "fairchem.core.models.uma.escn_md.Linear_Force_Head",
    "fairchem_dens.fairchem2.models.DeNSMLPEFSHead": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
}


def models(conservative: bool, channels: int, layers: int, device: str) -> tuple[HydraModel, HydraModel, HydraModel]:
    config = OmegaConf.to_container(OmegaConf.load(DIRECT), resolve=True)["runner"]["train_eval_unit"]["model"]
    config.pop("_target_")
    config["backbone"].update(
        sphere_channels=channels, hidden_channels=channels, edge_channels=channels, num_layers=layers
    )
    if conservative:
        config["backbone"].update(direct_forces=False, regress_stress=True)
        config["heads"] = {"energy": {"module": "fairchem_dens.fairchem2.models.DeNSMLPEFSHead"}}
        config["pass_through_head_outputs"] = True
    dens = HydraModel(**copy.deepcopy(config))
    block_config = copy.deepcopy(config)
    for head in block_config["heads"].values():
        if head["module"] in PLAIN:
            head["noise_head"] = "block"
    block = HydraModel(**block_config)
    block.load_state_dict(dens.state_dict(), strict=False)  # the same weights but the noise head
    config["backbone"]["model"] = PLAIN[config["backbone"]["model"]]
    for head in config["heads"].values():
        head["module"] = PLAIN.get(head["module"], head["module"])
    plain = HydraModel(**config)
    plain.load_state_dict({k: v for k, v in dens.state_dict().items() if k in plain.state_dict()})
    return plain.to(device).train(), dens.to(device).train(), block.to(device).train()


def tasks(conservative: bool):
    config = OmegaConf.load(CONFIG if conservative else DIRECT)
    return [hydra.utils.instantiate(t) for t in config["tasks"]]


def base_batch(structures: int) -> AtomicData:
    items = []
    for atoms in emt_structures(structures, seed=7):
        data = AtomicData.from_ase(atoms, task_name="emt")
        data.dataset, data.dataset_name = "emt", "emt.train"
        data.stress = data.stress.reshape(1, 9)
        items.append(data)
    return atomicdata_list_to_batch(items)


def step_functions(
    conservative: bool, structures: int, channels: int, layers: int, corrupt_ratio: float, device: str, steps: int
) -> dict:
    """name -> ``step(index)``: one training step's model work of ``plain``, ``dens`` (linear noise
    head) and ``block`` (block noise head) on the ``index``-th batch (``steps`` batches made)."""
    config = DeNSConfig.from_optim(
        {
            "use_denoising_pos": True,
            "denoising_pos_coefficient": 5,
            "denoising_pos_params": {"prob": 1.0, "fixed_noise_std": True, "std": 0.05, "corrupt_ratio": corrupt_ratio},
        }
    )
    base = base_batch(structures)
    plain, dens, block = models(conservative, channels, layers, device)
    plain_tasks, dens_tasks = tasks(conservative), tasks(conservative)
    step = DeNSStep(config, denoising_coefficient=5.0)
    roles = {"energy": ORIGINAL, "forces": REPLACED, "stress": EXCLUDED}
    for task in dens_tasks:
        task.loss_fn = DeNSTaskLoss(task, roles[task.property], step)

    def dens_step(index: int, model: HydraModel = dens) -> None:
        data = base.clone()
        corrupt_batch(config, data, seed=0, step=index)
        data[ENCODED_FORCES] = data.forces.clone()
        data = data.to(device)
        step.batch = data
        sum(compute_loss(dens_tasks, model(data), data).values()).backward()
        step.batch = None

    corrupted = []  # the plain model's batches: the same positions, corrupted before the clock starts
    for index in range(steps):
        data = base.clone()
        corrupt_batch(config, data, seed=0, step=index)
        corrupted.append(data)

    def plain_step(index: int) -> None:
        data = corrupted[index].clone().to(device)
        sum(compute_loss(plain_tasks, plain(data), data).values()).backward()

    return {
        "plain": plain_step,
        "dens": dens_step,
        "block": lambda index: dens_step(index, block),
        "atoms": base.pos.shape[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--structures", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--corrupt-ratio", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for conservative in (False, True):
        steps = step_functions(
            conservative, args.structures, args.channels, args.layers, args.corrupt_ratio, args.device, args.repeats + 2
        )
        atoms = steps.pop("atoms")
        medians = interleaved_medians(steps, args.repeats, args.device)
        kind = "conservative" if conservative else "direct"
        line = (
            f"{kind:12s} atoms={atoms} plain {1e3 * medians['plain']:.1f} ms, "
            f"DeNS {1e3 * medians['dens']:.1f} ms, DeNS/plain {medians['dens'] / medians['plain']:.3f}; "
            f"block noise head {1e3 * medians['block']:.1f} ms, block/linear {medians['block'] / medians['dens']:.3f}"
        )
        if args.device.startswith("cuda"):  # peak memory of one more step of each
            peaks = cuda_peaks(steps)
            line += f"; peak MiB plain {peaks['plain']:.0f}, DeNS {peaks['dens']:.0f}, block {peaks['block']:.0f}"
        print(line)


if __name__ == "__main__":
    main()
