"""dens_finetuning_model: a plain fairchem-2 checkpoint (eSEN-shaped or UMA mixture-of-experts) into the DeNS model."""

from __future__ import annotations

import pytest
import torch
from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.fairchem2.finetune import dens_finetuning_model

from fc2_helpers import DENS_FORCE_HEAD, DENS_MOE, batch, build, model_config, run, uma_shaped, write_checkpoint


def test_a_uma_checkpoint_becomes_a_dens_model_that_predicts_what_it_predicted(tmp_path):
    plain, path = uma_shaped(tmp_path)
    heads = {"energy": {"module": "fairchem.core.models.uma.escn_md.MLP_Energy_Head"}, "forces": DENS_FORCE_HEAD}
    dens = dens_finetuning_model(path, heads=heads, backbone={"model": DENS_MOE, "otf_graph": True})
    assert type(dens.backbone).__name__ == "DeNSeSCNMDMoeBackbone" and dens.backbone.num_experts == 2
    plain.eval(), dens.eval()
    expected, actual = run(plain, batch()), run(dens, batch())
    assert torch.equal(actual["energy"]["energy"], expected["energy"]["energy"])
    assert torch.equal(actual["forces"]["forces"], expected["forces"]["forces"])
    assert dens.finetune_model_full_config["backbone"]["model"] == DENS_MOE  # what resume.yaml rebuilds
    assert dens.finetune_model_full_config["model_id"] == "tiny-test-uma"


def test_a_backbone_of_another_size_is_refused(tmp_path):
    plain = build(dens=False)
    path = write_checkpoint(plain, model_config(dens=False), tmp_path / "esen.pt")
    with pytest.raises(DeNSSetupError, match="does not hold these backbone weights"):
        dens_finetuning_model(
            path,
            heads={"forces": DENS_FORCE_HEAD},
            backbone={"model": "fairchem_dens.fairchem2.models.DeNSeSCNMDBackbone", "sphere_channels": 32},
        )


def test_uma_conservative_heads_inside_fairchems_dataset_wrapper_and_their_plain_export(tmp_path):
    """UMA's conservative recipe wraps MLP_EFS_Head in DatasetSpecificMoEWrapper: the DeNS head
    goes there as head_cls, trains a noise head, and exports to fairchem's wrapper + MLP_EFS_Head."""
    from fairchem.core.units.mlip_unit.utils import load_inference_model

    from fairchem_dens.fairchem2.export import plain_inference_checkpoint

    from fc2_helpers import dens_batch

    plain, path = uma_shaped(tmp_path)
    heads = {
        "efs": {
            "module": "fairchem.core.models.uma.escn_moe.DatasetSpecificMoEWrapper",
            "head_cls": "fairchem_dens.fairchem2.models.DeNSMLPEFSHead",
            "head_kwargs": {"wrap_property": False},
            "dataset_names": ["emt"],
        }
    }
    backbone = {"model": DENS_MOE, "otf_graph": True, "direct_forces": False, "regress_stress": True}
    dens = dens_finetuning_model(path, heads=heads, backbone=backbone, pass_through_head_outputs=True).train()
    out = dens(dens_batch())
    assert set(out) >= {"emt_energy", "emt_forces", "emt_stress"}
    (out["emt_energy"]["energy"].sum() + out["emt_forces"]["forces"].square().sum()).backward()
    assert dens.output_heads["efs"].head.noise_linear.weight.grad.abs().sum() > 0

    dens.eval()
    config = dict(dens.finetune_model_full_config)
    checkpoint = plain_inference_checkpoint(
        MLIPInferenceCheckpoint(
            model_config=config, model_state_dict=dens.state_dict(), ema_state_dict=None, tasks_config=[]
        )
    )
    assert checkpoint.model_config["heads"]["efs"]["head_cls"] == "fairchem.core.models.uma.escn_md.MLP_EFS_Head"
    exported, _ = load_inference_model(None, use_ema=False, preloaded_checkpoint=checkpoint)
    exported = exported.eval()
    expected, actual = run(dens, batch()), run(exported, batch())
    for key in ("emt_energy", "emt_forces", "emt_stress"):
        name = key.split("_")[1]
        assert torch.equal(actual[key][name], expected[key][name]), key
