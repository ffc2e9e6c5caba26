"""DeNS eSCN-MD on fairchem 2, in memory: plain outside DeNS batches, blocks on their atoms,
gradients, equivariance of the encoding, and the plain inference checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch
from fairchem.core.models.base import HydraModel
from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint
from fairchem.core.units.mlip_unit.utils import load_inference_model

from conftest import DIRECT_CONFIG
from fairchem_dens.core.batch import corrupt_batch, corrupted_atoms
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.fairchem2.emt_data import emt_structures
from fairchem_dens.fairchem2.export import plain_inference_checkpoint
from fairchem_dens.fairchem2.models import ENCODED_FORCES
from fairchem_dens.testing.tolerances import ESEN_ROTATION_REL

PLAIN_BACKBONE = "fairchem.core.models.uma.escn_md.eSCNMDBackbone"
PLAIN_FORCE_HEAD = "fairchem.core.models.uma.escn_md.Linear_Force_Head"
PLAIN_HEADS = {"fairchem_dens.fairchem2.models.DeNSLinearForceHead": PLAIN_FORCE_HEAD,
               "fairchem_dens.fairchem2.models.DeNSMLPEFSHead": "fairchem.core.models.uma.escn_md.MLP_EFS_Head"}


def model_config(dens: bool, conservative: bool = False) -> dict:
    """The shipped direct config's model (or its conservative twin, the fine-tuning config's
    backbone switches and head), with DeNS classes or fairchem's plain ones."""
    config = OmegaConf.to_container(OmegaConf.load(DIRECT_CONFIG), resolve=True)["runner"]["train_eval_unit"]["model"]
    if conservative:
        config["backbone"].update(direct_forces=False, regress_stress=True)
        config["heads"] = {"energy": {"module": "fairchem_dens.fairchem2.models.DeNSMLPEFSHead"}}
        config["pass_through_head_outputs"] = True
    if not dens:
        config["backbone"]["model"] = PLAIN_BACKBONE
        for head in config["heads"].values():
            head["module"] = PLAIN_HEADS.get(head["module"], head["module"])
    return config


def build(dens: bool, seed: int = 0, conservative: bool = False) -> HydraModel:
    config = model_config(dens, conservative)
    config.pop("_target_")
    torch.manual_seed(seed)
    return HydraModel(**config)


@pytest.fixture(scope="module")
def models():
    """(plain, DeNS) with the same weights; the DeNS-only parameters are extra."""
    plain, dens = build(False), build(True, seed=1)
    result = dens.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted({k.split(".")[1] if k.startswith("backbone") else k.split(".")[2] for k in result.missing_keys}) == [
        "force_embedding", "noise_linear"]
    return plain, dens


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
    config = DeNSConfig.from_optim({"use_denoising_pos": True, "denoising_pos_coefficient": 5,
                                    "denoising_pos_params": {"prob": 1.0, "fixed_noise_std": True, "std": 0.05,
                                                             "corrupt_ratio": corrupt_ratio}})
    data = batch()
    assert corrupt_batch(config, data, seed=0, step=step)
    data[ENCODED_FORCES] = data.forces.clone()  # what the unit stores (one force task here)
    return data


@pytest.mark.parametrize("training", [False, True])
def test_outside_dens_batches_the_model_is_exactly_the_plain_one(models, training):
    plain, dens = models
    plain.train(training), dens.train(training)
    expected, actual = run(plain, batch()), run(dens, batch())
    assert torch.equal(actual["energy"]["energy"], expected["energy"]["energy"])
    assert torch.equal(actual["forces"]["forces"], expected["forces"]["forces"])


def _count_calls(*modules):
    calls = {}
    for module in modules:
        module.register_forward_hook(lambda m, args, out: calls.__setitem__(m, args[0].shape[0]))
    return calls


def test_noise_block_and_encoding_never_run_outside_dens_batches_and_each_block_runs_on_its_atoms():
    dens = build(True).eval()
    head = dens.output_heads["forces"]
    calls = _count_calls(head.noise_linear, head.linear, dens.backbone.force_embedding)
    dens(batch())
    assert set(calls) == {head.linear}
    calls.clear()
    data = dens_batch()
    corrupted = corrupted_atoms(data)
    dens(data)
    assert calls[head.noise_linear] == int(corrupted.sum())
    assert calls[head.linear] == int((~corrupted).sum())
    assert calls[dens.backbone.force_embedding] == data.pos.shape[0]


@pytest.mark.parametrize("conservative", [False, True])
@pytest.mark.parametrize("kind", ["partial", "full", "s2ef"])
def test_every_parameter_gets_a_gradient_in_training(kind, conservative):
    dens = build(True, conservative=conservative).train()
    data = {"partial": lambda: dens_batch(0.5), "full": lambda: dens_batch(None), "s2ef": batch}[kind]()
    out = _outputs(dens(data))
    (out["energy"].sum() + out["forces"].square().sum()).backward()
    missing = [name for name, p in dens.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_the_encoding_is_zero_on_clean_atoms_and_changes_corrupted_ones(models):
    _, dens = models
    dens.eval()
    data = dens_batch()
    corrupted = corrupted_atoms(data)
    added = {}
    dens.backbone.edge_degree_embedding.register_forward_pre_hook(
        lambda m, args: added.__setitem__("x", args[0].detach().clone()))
    dens(copy.deepcopy(data))
    with_encoding = added["x"]
    data[ENCODED_FORCES] = torch.zeros_like(data.pos)  # zero forces: zero harmonics, the bias alone
    dens(data)
    difference = (with_encoding - added["x"]).abs().sum(dim=(1, 2))
    assert torch.equal(difference[~corrupted], torch.zeros_like(difference[~corrupted]))
    assert bool((difference[corrupted] > 0).all())


def _rotation(seed: int = 3) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.linalg.det(q))).float()


def _rotated(data: AtomicData, rotation: torch.Tensor, forces: bool) -> AtomicData:
    data = copy.deepcopy(data)
    data.pos = data.pos @ rotation.T
    data.cell = data.cell @ rotation.T
    if forces:
        data[ENCODED_FORCES] = data[ENCODED_FORCES] @ rotation.T
    return data


def test_noise_prediction_is_equivariant_with_the_encoded_forces_rotated_and_not_without():
    dens = build(True).eval()
    with torch.no_grad():  # a random encoding layer of the size of the node features: visible effect
        dens.backbone.force_embedding.weight.normal_(0.0, 1.0)
    data, rotation = dens_batch(), _rotation()
    reference = dens(copy.deepcopy(data))["forces"]["forces"] @ rotation.T
    scale = float(reference.detach().abs().max())
    rotated = dens(_rotated(data, rotation, forces=True))["forces"]["forces"]
    unrotated = dens(_rotated(data, rotation, forces=False))["forces"]["forces"]
    error = float((rotated - reference).detach().abs().max()) / scale
    # eSCN-MD with gate activations and spectral MLPs (eSEN's layers) is exactly equivariant up to round-off
    assert error <= ESEN_ROTATION_REL
    assert float((unrotated - reference).detach().abs().max()) / scale > 100 * ESEN_ROTATION_REL


@pytest.mark.parametrize("use_ema", [True, False])
def test_plain_inference_checkpoint_gives_the_dens_models_predictions(use_ema):
    dens = build(True).eval()
    ema = torch.optim.swa_utils.AveragedModel(dens)
    checkpoint = MLIPInferenceCheckpoint(model_config=model_config(True), model_state_dict=dens.state_dict(),
                                         ema_state_dict=ema.state_dict(), tasks_config=[])
    plain_checkpoint = plain_inference_checkpoint(checkpoint)
    plain, _ = load_inference_model(None, use_ema=use_ema, preloaded_checkpoint=plain_checkpoint)
    plain = (plain.module if use_ema else plain).eval()
    assert type(plain.backbone).__module__ == "fairchem.core.models.uma.escn_md"
    assert type(plain.output_heads["forces"]).__name__ == "Linear_Force_Head"
    expected, actual = run(dens, batch()), run(plain, batch())
    assert torch.equal(actual["energy"]["energy"], expected["energy"]["energy"])
    assert torch.equal(actual["forces"]["forces"], expected["forces"]["forces"])
    assert checkpoint.model_config["backbone"]["model"].startswith("fairchem_dens")  # the input is untouched


def _outputs(out: dict) -> dict:
    """{name: tensor} of a HydraModel output (per-head dicts or pass-through)."""
    return {k: v[k] for k, v in out.items() if k in ("energy", "forces", "stress")}


@pytest.mark.parametrize("training", [False, True])
def test_conservative_dens_model_outside_dens_batches_is_exactly_fairchems(training):
    plain, dens = build(False, conservative=True), build(True, seed=1, conservative=True)
    assert sorted(dens.load_state_dict(plain.state_dict(), strict=False).missing_keys) == [
        "backbone.force_embedding.bias", "backbone.force_embedding.weight",
        "output_heads.energy.noise_linear.bias", "output_heads.energy.noise_linear.weight"]
    plain.train(training), dens.train(training)
    expected, actual = _outputs(run(plain, batch())), _outputs(run(dens, batch()))
    assert set(actual) == {"energy", "forces", "stress"}
    for name in actual:
        assert torch.equal(actual[name], expected[name]), name


def test_conservative_dens_terms_each_carry_gradient():
    """Energy of the original structure, -dE/dx on clean atoms, the noise on corrupted ones."""
    dens = build(True, conservative=True).train()
    head = dens.output_heads["energy"]
    calls = _count_calls(head.noise_linear)
    data = dens_batch()
    corrupted = corrupted_atoms(data)
    out = _outputs(dens(data))
    assert calls[head.noise_linear] == int(corrupted.sum())
    parameters = {"backbone": dens.backbone.sphere_embedding.weight, "energy_block": head.energy_block[0].weight,
                  "noise": head.noise_linear.weight, "encoding": dens.backbone.force_embedding.weight}
    terms = {"energy": out["energy"].sum(), "clean forces": out["forces"][~corrupted].square().sum(),
             "noise": out["forces"][corrupted].square().sum()}
    reaches = {}
    for term, value in terms.items():
        grads = torch.autograd.grad(value, list(parameters.values()), retain_graph=True, allow_unused=True)
        reaches[term] = {name for name, g in zip(parameters, grads) if g is not None and bool(g.abs().sum() > 0)}
    assert reaches["energy"] == {"backbone", "energy_block", "encoding"}
    assert reaches["clean forces"] == {"backbone", "energy_block", "encoding"}  # -dE/dx: second order in training
    assert reaches["noise"] == {"backbone", "noise", "encoding"}


def test_uma_mixture_of_experts_backbone_takes_the_same_hook():
    """eSCNMDMoeBackbone does not override forward: the DeNS twin is plain outside DeNS batches
    and trains every parameter (experts included) in a DeNS batch."""
    def moe(dens: bool, seed: int) -> HydraModel:
        config = model_config(dens)
        config.pop("_target_")
        config["backbone"]["model"] = ("fairchem_dens.fairchem2.models.DeNSeSCNMDMoeBackbone" if dens
                                       else "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone")
        config["backbone"].update(num_experts=2, use_composition_embedding=True)
        torch.manual_seed(seed)
        return HydraModel(**config)

    plain, dens = moe(False, 0), moe(True, 1)
    assert sorted(dens.load_state_dict(plain.state_dict(), strict=False).missing_keys) == [
        "backbone.force_embedding.bias", "backbone.force_embedding.weight",
        "output_heads.forces.noise_linear.bias", "output_heads.forces.noise_linear.weight"]
    plain.eval(), dens.eval()
    expected, actual = run(plain, batch()), run(dens, batch())
    assert torch.equal(actual["energy"]["energy"], expected["energy"]["energy"])
    assert torch.equal(actual["forces"]["forces"], expected["forces"]["forces"])
    dens.train()
    out = dens(dens_batch())
    (out["energy"]["energy"].sum() + out["forces"]["forces"].square().sum()).backward()
    assert not [name for name, p in dens.named_parameters() if p.requires_grad and p.grad is None]
