"""DeNS eSCN-MD on fairchem 2, in memory: plain outside DeNS batches, blocks on their atoms,
gradients, equivariance of the encoding, and the plain inference checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from fairchem.core.datasets.atomic_data import AtomicData
from fairchem.core.models.base import HydraModel
from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint
from fairchem.core.units.mlip_unit.utils import load_inference_model

from fairchem_dens.core.batch import corrupted_atoms
from fairchem_dens.core.encoding import KCAL_PER_MOL_PER_EV
from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.fairchem2.export import plain_inference_checkpoint
from fairchem_dens.fairchem2.models import ENCODED_FORCES
from fairchem_dens.testing.original_encoding import original_force_encoding
from fairchem_dens.testing.tolerances import (
    ELEMENTWISE_ULPS,
    ESEN_ROTATION_REL,
    MUST_DIFFER_ULPS,
    REORDERED_ULPS,
    assert_ulps,
    f32_tol,
)

from fc2_helpers import batch, build, dens_batch, model_config, outputs, run


@pytest.fixture(scope="module")
def models():
    """(plain, DeNS) with the same weights; the DeNS-only parameters are extra."""
    plain, dens = build(False), build(True, seed=1)
    result = dens.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted({k.split(".")[1] if k.startswith("backbone") else k.split(".")[2] for k in result.missing_keys}) == [
        "force_embedding",
        "noise_linear",
    ]
    return plain, dens


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


def test_noise_block_never_runs_outside_dens_batches_the_encoding_on_one_zero_force_and_each_block_on_its_atoms():
    dens = build(True).eval()
    head = dens.output_heads["forces"]
    calls = _count_calls(head.noise_linear, head.linear, dens.backbone.force_embedding)
    dens(batch())
    assert set(calls) == {head.linear, dens.backbone.force_embedding}
    assert calls[dens.backbone.force_embedding] == 1  # the encoding of a zero force: the bias, broadcast
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
    out = outputs(dens(data))
    (out["energy"].sum() + out["forces"].square().sum()).backward()
    missing = [name for name, p in dens.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_clean_atoms_get_the_encodings_bias_alone_and_corrupted_ones_their_force(models):
    _, dens = models
    dens.eval()
    data = dens_batch()
    corrupted = corrupted_atoms(data)
    added = {}
    dens.backbone.edge_degree_embedding.register_forward_pre_hook(
        lambda m, args: added.__setitem__("x", args[0].detach().clone())
    )
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
    with torch.no_grad():  # a trained encoding has a bias, which every atom receives outside DeNS batches too
        dens.backbone.force_embedding.bias.normal_()
    ema = torch.optim.swa_utils.AveragedModel(dens)
    config = model_config(True)
    config["backbone"]["force_encoding_scale"] = KCAL_PER_MOL_PER_EV  # a DeNS keyword plain fairchem refuses
    checkpoint = MLIPInferenceCheckpoint(
        model_config=config, model_state_dict=dens.state_dict(), ema_state_dict=ema.state_dict(), tasks_config=[]
    )
    plain_checkpoint = plain_inference_checkpoint(checkpoint)
    plain, _ = load_inference_model(None, use_ema=use_ema, preloaded_checkpoint=plain_checkpoint)
    plain = (plain.module if use_ema else plain).eval()
    assert type(plain.backbone).__module__ == "fairchem.core.models.uma.escn_md"
    assert type(plain.output_heads["forces"]).__name__ == "Linear_Force_Head"
    expected, actual = run(dens, batch()), run(plain, batch())
    # The bias is folded into the atom embedding: (embedding + bias) + system embedding in place of
    # (embedding + system embedding) + bias, one rounding of the first features, carried through
    # the network: REORDERED_ULPS of each output's scale.
    assert_ulps(actual["energy"]["energy"], expected["energy"]["energy"], REORDERED_ULPS, what="energy")
    assert_ulps(actual["forces"]["forces"], expected["forces"]["forces"], REORDERED_ULPS, what="forces")
    # Negative control: the bias dropped instead of folded changes the predictions.
    dropped = copy.deepcopy(plain)
    with torch.no_grad():
        dropped.backbone.sphere_embedding.weight -= dens.backbone.force_embedding.bias.view(1, -1)
    energy = run(dropped, batch())["energy"]["energy"].detach()
    scale = expected["energy"]["energy"].abs().max()
    assert float((energy - expected["energy"]["energy"]).abs().max()) > f32_tol(scale, MUST_DIFFER_ULPS)
    assert checkpoint.model_config["backbone"]["model"].startswith("fairchem_dens")  # the input is untouched


def test_a_scale_that_is_not_a_positive_number_is_refused_before_the_model_is_built():
    with pytest.raises(DeNSSetupError, match="force_encoding_scale"):
        build(True, encoding_scale=-23.06)


def test_the_scaled_encoding_equals_the_originals_encoding_of_the_forces_in_its_unit():
    """force_encoding_scale 23.06 on eV/Å forces is the original MD17 code's encoding of kcal/mol/Å."""
    dens = build(True, encoding_scale=KCAL_PER_MOL_PER_EV).eval()
    layer = dens.backbone.force_embedding
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    data = dens_batch()
    corrupted = corrupted_atoms(data)
    seen = {}
    embedding = dens.backbone.edge_degree_embedding  # the node features before and after our hook
    embedding.register_forward_pre_hook(lambda m, args: seen.__setitem__("before", args[0].clone()), prepend=True)
    embedding.register_forward_pre_hook(lambda m, args: seen.__setitem__("after", args[0].clone()))
    with torch.no_grad():
        dens(data)
    with_encoding = seen["after"]
    ours = with_encoding - seen["before"]  # what the hook added
    kcal = (data[ENCODED_FORCES].double() * KCAL_PER_MOL_PER_EV).float()  # the same forces, in kcal/mol/Å
    expected = original_force_encoding(kcal, corrupted, layer.weight, layer.bias)
    # The scaled eV/Å forces vs the kcal/mol/Å ones rounded once (1 ulp), a handful of elementwise
    # ops, one weight times coefficient plus bias, and the hook's sum with the atom embedding and
    # our difference of two sums (2 ulps of the node features): ELEMENTWISE_ULPS of the largest.
    assert_ulps(ours, expected, ELEMENTWISE_ULPS, scale=float(with_encoding.abs().max()), what="encoding")
    assert bool(corrupted.any()) and not bool(corrupted.all())
    # Negative control: scale 1 (eV/Å as stored) is 23x weaker on the corrupted atoms.
    weak = original_force_encoding(data[ENCODED_FORCES].float(), corrupted, layer.weight, layer.bias)
    assert float((weak - ours)[corrupted].abs().max()) > f32_tol(with_encoding.abs().max(), MUST_DIFFER_ULPS)


@pytest.mark.parametrize("training", [False, True])
def test_conservative_dens_model_outside_dens_batches_is_exactly_fairchems(training):
    plain, dens = build(False, conservative=True), build(True, seed=1, conservative=True)
    assert sorted(dens.load_state_dict(plain.state_dict(), strict=False).missing_keys) == [
        "backbone.force_embedding.bias",
        "backbone.force_embedding.weight",
        "output_heads.energy.noise_linear.bias",
        "output_heads.energy.noise_linear.weight",
    ]
    plain.train(training), dens.train(training)
    expected, actual = outputs(run(plain, batch())), outputs(run(dens, batch()))
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
    out = outputs(dens(data))
    assert calls[head.noise_linear] == int(corrupted.sum())
    parameters = {
        "backbone": dens.backbone.sphere_embedding.weight,
        "energy_block": head.energy_block[0].weight,
        "noise": head.noise_linear.weight,
        "encoding": dens.backbone.force_embedding.weight,
    }
    terms = {
        "energy": out["energy"].sum(),
        "clean forces": out["forces"][~corrupted].square().sum(),
        "noise": out["forces"][corrupted].square().sum(),
    }
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
        config["backbone"]["model"] = (
            "fairchem_dens.fairchem2.models.DeNSeSCNMDMoeBackbone"
            if dens
            else "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone"
        )
        config["backbone"].update(num_experts=2, use_composition_embedding=True)
        torch.manual_seed(seed)
        return HydraModel(**config)

    plain, dens = moe(False, 0), moe(True, 1)
    assert sorted(dens.load_state_dict(plain.state_dict(), strict=False).missing_keys) == [
        "backbone.force_embedding.bias",
        "backbone.force_embedding.weight",
        "output_heads.forces.noise_linear.bias",
        "output_heads.forces.noise_linear.weight",
    ]
    plain.eval(), dens.eval()
    expected, actual = run(plain, batch()), run(dens, batch())
    assert torch.equal(actual["energy"]["energy"], expected["energy"]["energy"])
    assert torch.equal(actual["forces"]["forces"], expected["forces"]["forces"])
    dens.train()
    out = dens(dens_batch())
    (out["energy"]["energy"].sum() + out["forces"]["forces"].square().sum()).backward()
    assert not [name for name, p in dens.named_parameters() if p.requires_grad and p.grad is None]
