"""``noise_head: block`` on fairchem 2 (one eSCN-MD block as the noise head), in memory: it never runs
outside DeNS batches, runs on the corrupted atoms' incoming subgraph and gives there what the
block gives on the whole graph, trains every parameter, is equivariant, and the plain inference
checkpoint drops it."""

from __future__ import annotations

import copy

import pytest
import torch
from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint
from fairchem.core.units.mlip_unit.utils import load_inference_model

from fairchem_dens.core.batch import corrupted_atoms
from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.core.modules import EDGE_INPUTS, l1_vectors
from fairchem_dens.fairchem2.export import plain_inference_checkpoint
from fairchem_dens.fairchem2.models import ENCODED_FORCES
from fairchem_dens.testing.tolerances import ESEN_ROTATION_REL

from fc2_helpers import batch, build, dens_batch, model_config, outputs, run

HEAD = {False: "forces", True: "energy"}  # the DeNS head of the direct and the conservative model


def _noise_block(model, conservative: bool):
    return model.output_heads[HEAD[conservative]].noise_block


@pytest.mark.parametrize("conservative", [False, True])
def test_outside_dens_batches_the_block_model_is_exactly_the_plain_one_and_the_block_never_runs(conservative):
    plain, dens = (
        build(False, conservative=conservative),
        build(True, seed=1, conservative=conservative, noise_head="block"),
    )
    missing = dens.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert {k.split(".")[2] for k in missing if k.startswith("output_heads")} == {"noise_block"}
    calls = []
    _noise_block(dens, conservative).register_forward_hook(lambda *args: calls.append(1))
    for training in (False, True):
        plain.train(training), dens.train(training)
        expected, actual = outputs(run(plain, batch())), outputs(run(dens, batch()))
        for name in expected:
            assert torch.equal(actual[name], expected[name]), name
    assert calls == []


@pytest.mark.parametrize("conservative", [False, True])
def test_the_block_runs_on_the_corrupted_atoms_subgraph_and_equals_the_whole_graph_block_there(conservative):
    dens = build(True, conservative=conservative, noise_head="block").eval()
    block = _noise_block(dens, conservative)
    seen = {}
    block.block.register_forward_hook(lambda m, args, out: seen.update(nodes=args[0].shape[0], edges=args[2].shape[1]))
    data = dens_batch()
    corrupted = corrupted_atoms(data)
    torch.manual_seed(0)
    forces = outputs(dens(copy.deepcopy(data)))["forces"]
    torch.manual_seed(0)
    emb = dens.backbone(copy.deepcopy(data))
    edge_index = emb[EDGE_INPUTS][0]
    incoming = corrupted[edge_index[1]]
    assert seen["edges"] == int(incoming.sum()) < edge_index.shape[1]
    # its nodes: the corrupted atoms and the sources of their edges (in these dense cells, often all)
    assert seen["nodes"] == int(
        torch.unique(torch.cat((corrupted.nonzero().view(-1), edge_index[0, incoming]))).numel()
    )
    # the same block on the whole graph, read on the corrupted atoms
    everything = torch.ones_like(corrupted)
    whole = block(emb["node_embedding"], emb[EDGE_INPUTS], everything).detach()
    scale = float(whole[corrupted].abs().max())
    # the same edges in the same order into each wanted atom: equal up to the round-off of the
    # scatter's summation (a few float32 ulps of the largest value)
    tolerance = 64 * torch.finfo(torch.float32).eps * scale
    assert float((forces[corrupted].detach() - whole[corrupted]).abs().max()) <= tolerance
    # negative control: another atom's rows are not within it
    assert float((forces[corrupted].detach() - whole[corrupted.roll(1)]).abs().max()) > 1000 * tolerance


@pytest.mark.parametrize("conservative", [False, True])
@pytest.mark.parametrize("kind", ["partial", "s2ef"])
def test_every_parameter_gets_a_gradient_in_training(kind, conservative):
    dens = build(True, conservative=conservative, noise_head="block").train()
    data = dens_batch(0.5) if kind == "partial" else batch()
    out = outputs(dens(data))
    (out["energy"].sum() + out["forces"].square().sum()).backward()
    assert not [name for name, p in dens.named_parameters() if p.requires_grad and p.grad is None]
    grads = [p.grad for p in _noise_block(dens, conservative).parameters()]
    assert any(bool(g.abs().sum() > 0) for g in grads) == (kind == "partial")


def test_the_block_noise_prediction_is_equivariant():
    dens = build(True, noise_head="block").eval()
    with torch.no_grad():
        dens.backbone.force_embedding.weight.normal_(0.0, 1.0)
    data = dens_batch()
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    rotation = (q * torch.sign(torch.linalg.det(q))).float()
    corrupted = corrupted_atoms(data)
    reference = dens(copy.deepcopy(data))["forces"]["forces"][corrupted] @ rotation.T
    rotated_data = copy.deepcopy(data)
    rotated_data.pos, rotated_data.cell = data.pos @ rotation.T, data.cell @ rotation.T
    rotated_data[ENCODED_FORCES] = data[ENCODED_FORCES] @ rotation.T
    rotated = dens(rotated_data)["forces"]["forces"][corrupted]
    scale = float(reference.detach().abs().max())
    assert float((rotated - reference).detach().abs().max()) / scale <= ESEN_ROTATION_REL
    # negative control: the unrotated prediction is far from the rotated one
    assert (
        float((dens(copy.deepcopy(data))["forces"]["forces"][corrupted] - reference).detach().abs().max()) / scale
        > 100 * ESEN_ROTATION_REL
    )


@pytest.mark.parametrize("conservative", [False, True])
def test_the_plain_inference_checkpoint_drops_the_block_and_its_keyword(conservative):
    dens = build(True, conservative=conservative, noise_head="block").eval()
    config = model_config(True, conservative, "block")
    checkpoint = MLIPInferenceCheckpoint(
        model_config=config, model_state_dict=dens.state_dict(), ema_state_dict=None, tasks_config=[]
    )
    plain_checkpoint = plain_inference_checkpoint(checkpoint)
    assert not [k for k in plain_checkpoint.model_state_dict if "noise_block" in k or "force_embedding" in k]
    assert all("noise_head" not in head for head in plain_checkpoint.model_config["heads"].values())
    plain, _ = load_inference_model(None, use_ema=False, preloaded_checkpoint=plain_checkpoint)
    plain.eval()
    expected, actual = outputs(run(dens, batch())), outputs(run(plain, batch()))
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_a_noise_head_other_than_linear_or_block_is_refused_naming_the_key():
    with pytest.raises(DeNSSetupError, match="noise_head.*'attention'"):
        build(True, noise_head="attention")


def test_l1_vectors_reads_the_l1_coefficients_of_a_one_channel_layer():
    # the shared read-out: with an identity-like layer it returns the l = 1 coefficients
    features = torch.arange(2 * 9 * 1, dtype=torch.float32).reshape(2, 9, 1)
    assert torch.equal(l1_vectors(lambda x: x, features), features[:, 1:4, 0])


@pytest.mark.parametrize("conservative", [False, True])
def test_the_block_trains_under_bf16_autocast_as_fairchems_amp_runs_it(conservative):
    """fairchem runs heads outside autocast: the backbone's bf16 edge inputs reach the block in float32."""
    dens = build(True, conservative=conservative, noise_head="block").train()
    data = dens_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = outputs(dens(data))
    noise = out["forces"][corrupted_atoms(data)]
    assert noise.dtype == torch.float32 and bool(torch.isfinite(noise).all())
    (out["energy"].float().sum() + out["forces"].square().sum()).backward()
    assert all(
        p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in _noise_block(dens, conservative).parameters()
    )


def test_no_tensor_of_a_batch_stays_on_the_model_so_it_deep_copies_after_a_forward():
    dens = build(True, conservative=True, noise_head="block").train()
    dens(dens_batch())
    copy.deepcopy(dens)  # what an EMA copy or a checkpoint of a trained model does
