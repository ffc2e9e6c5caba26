"""Every backbone adapter through the shared suite (fairchem_dens/testing/backbone_suite.py): one class each."""

from __future__ import annotations

import torch

from fairchem_dens.models.dens_features import fold_force_encoding_bias
from fairchem_dens.models.esen import plain_esen_state_dict
from fairchem_dens.testing import (
    TINY_EQV2_BACKBONE,
    TINY_ESCN_BACKBONE,
    TINY_ESEN_BACKBONE,
    eqv2_dens_model_config,
    escn_dens_model_config,
    esen_dens_model_config,
)
from fairchem_dens.testing.backbone_suite import BackboneSuite, BlockNoiseHeadSuite
from fairchem_dens.testing.tolerances import (
    EQV2_ROTATION_REL,
    ESCN_ROTATION_REL,
    ESEN_CONSERVATIVE_ROTATION_REL,
    ESEN_ROTATION_REL,
)

from helpers import QUICKSTART, data_overrides


def _fold_encoding_bias(ours: torch.nn.Module, renames: tuple[tuple[str, str], ...] = ()) -> dict:
    """Our weights for the plain model: no noise block, the encoding bias folded into the atom embedding."""
    state = {}
    for key, value in fold_force_encoding_bias(ours.state_dict()).items():
        if "denoising_pos_block" in key:
            continue
        for old, new in renames:
            key = key.replace(old, new)
        state[key] = value
    return state


class TestEquiformerV2(BackboneSuite):
    family = "equiformer_v2"
    noise_block = ("forces", "denoising_pos_block")
    force_block = ("forces", "vector_block")
    rotation_tolerance = EQV2_ROTATION_REL
    cli_config = QUICKSTART / "eqv2_dens_tiny.yml"

    def model_config(self, flavour="ours", backbone=None, **dens):
        return eqv2_dens_model_config(flavour, backbone=backbone, **dens)

    def rotation_backbone(self):
        # uncapped neighbour lists: ties at a max_neighbors cut make the graph rotation dependent
        return {**TINY_EQV2_BACKBONE, "max_neighbors": 1000}

    def plain_state_dict(self, ours):
        return _fold_encoding_bias(
            ours,
            (
                ("output_heads.energy.scalar_block", "output_heads.energy.energy_block"),
                ("output_heads.forces.vector_block", "output_heads.forces.force_block"),
            ),
        )

    def cli_data(self, request):
        return data_overrides(request.getfixturevalue("emt_data"))


class TestESCN(BackboneSuite):
    family = "escn"
    noise_block = ("forces", "denoising_pos_block")
    force_block = ("forces", "force_block")
    rotation_tolerance = ESCN_ROTATION_REL
    cli_config = QUICKSTART / "escn_dens_tiny.yml"

    def model_config(self, flavour="ours", backbone=None, **dens):
        return escn_dens_model_config(flavour, backbone=backbone, **dens)

    def rotation_backbone(self):
        return {**TINY_ESCN_BACKBONE, "max_neighbors": 1000, "num_sphere_samples": 512}

    def plain_state_dict(self, ours):
        return _fold_encoding_bias(ours)

    def cli_data(self, request):
        return data_overrides(request.getfixturevalue("emt_data"))


class TestESEN(BackboneSuite):
    family = "esen"
    noise_block = ("forces", "denoising_linear")
    force_block = ("forces", "linear")
    rotation_tolerance = ESEN_ROTATION_REL
    cli_config = QUICKSTART / "esen_dens_bulk_tiny.yml"

    def model_config(self, flavour="ours", backbone=None, **dens):
        return esen_dens_model_config(flavour, backbone=backbone, **dens)

    def rotation_backbone(self):
        return {**TINY_ESEN_BACKBONE, "max_neighbors": 1000}

    def plain_state_dict(self, ours):
        state = _fold_encoding_bias(ours)
        return {k: v for k, v in state.items() if "denoising_linear" not in k}

    def cli_data(self, request):
        return request.getfixturevalue("bulk_overrides")


class TestESENConservative(TestESEN):
    noise_block = ("energy", "denoising_linear")
    force_block = ("energy", "energy_block")
    force_block_in_full = True
    outputs = ("energy", "forces", "stress")
    rotation_tolerance = ESEN_CONSERVATIVE_ROTATION_REL
    cli_config = QUICKSTART / "esen_dens_conservative_bulk_tiny.yml"

    def model_config(self, flavour="ours", backbone=None, **dens):
        return esen_dens_model_config(f"{flavour}_conservative", backbone=backbone, **dens)

    def plain_state_dict(self, ours):
        return plain_esen_state_dict(ours.state_dict())  # the to-conservative conversion itself


class TestESENBlockNoiseHead(BlockNoiseHeadSuite, TestESEN):
    """``noise_head: block``: an eSEN message-passing block as the noise head, direct forces."""

    noise_block = ("forces", "denoising_block")

    def model_config(self, flavour="ours", backbone=None, **dens):
        return esen_dens_model_config(flavour, backbone=backbone, noise_head="block", **dens)

    def plain_state_dict(self, ours):
        return {k: v for k, v in _fold_encoding_bias(ours).items() if "denoising_block" not in k}

    def cli_data(self, request):
        return [*super().cli_data(request), "--model.heads.forces.noise_head=block"]


class TestESENConservativeBlockNoiseHead(BlockNoiseHeadSuite, TestESENConservative):
    """``noise_head: block`` on the conservative head (the paper's MD17 model: gradient forces, a block noise head)."""

    noise_block = ("energy", "denoising_block")

    def model_config(self, flavour="ours", backbone=None, **dens):
        return esen_dens_model_config(f"{flavour}_conservative", backbone=backbone, noise_head="block", **dens)

    def cli_data(self, request):
        return [*super().cli_data(request), "--model.heads.energy.noise_head=block"]
