"""The force-encoding scale: the MD17 recipes encode kcal/mol/Å as the original MD17 code does.

The original encodes the MD17 files' forces as they are, in kcal/mol/Å; ``md17-to-lmdb``
stores eV/Å. With ``force_encoding_scale`` 23.06 our encoding of the stored eV/Å forces must
equal the original's encoding of the file's kcal/mol/Å forces (same weights), on a batch the
recipe's own trainer loaded and corrupted from the shipped GFN2-xTB ethanol.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairchem_dens.core.encoding import KCAL_PER_MOL_PER_EV, check_force_encoding_scale
from fairchem_dens.core.errors import DeNSSetupError
from fairchem_dens.datasets.md17 import KCAL_PER_MOL_IN_EV, convert_md17
from fairchem_dens.models.dens_features import dens_node_features
from fairchem_dens.resources import configs_dir, example_trajectory
from fairchem_dens.testing import fairchem_trainer, mixed_dens_batch
from fairchem_dens.testing.original_encoding import original_force_encoding
from fairchem_dens.testing.tolerances import ELEMENTWISE_ULPS, EPS64, MUST_DIFFER_ULPS, assert_ulps, f32_tol

RECIPE = configs_dir() / "md17" / "esen" / "paper_md17_conservative.yml"


def test_the_scale_is_the_kcal_per_mol_in_an_ev_that_md17_to_lmdb_divides_by():
    assert KCAL_PER_MOL_PER_EV * KCAL_PER_MOL_IN_EV == pytest.approx(1.0, rel=4 * EPS64)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "23.06", None])
def test_a_scale_that_is_not_a_positive_number_is_refused_naming_the_key(bad):
    with pytest.raises(DeNSSetupError, match="force_encoding_scale"):
        check_force_encoding_scale(bad)


@pytest.fixture(scope="module")
def recipe_batch(tmp_path_factory):
    """(trainer's backbone, a batch its trainer corrupted, the file's kcal/mol/Å forces of its atoms)."""
    folder = tmp_path_factory.mktemp("encoding")
    splits = convert_md17(example_trajectory(), folder / "data", n_train=64, n_val=8)
    with fairchem_trainer(
        RECIPE,
        folder / "run",
        f"--dataset.train.src={splits['train']}",
        f"--dataset.val.src={splits['val']}",
        f"--dataset.test.src={splits['test']}",
        "--optim.denoising_pos_params.prob=0.5",
    ) as context:
        trainer = context.trainer
        batch, _ = mixed_dens_batch(trainer)
        backbone = trainer._unwrapped_model.backbone
        with np.load(example_trajectory()) as npz:  # what the original reads: the file, float32
            kcal = torch.from_numpy(np.concatenate([npz["F"][int(sid)] for sid in batch.sid])).float()
        yield backbone, batch, kcal


def test_the_recipes_encoding_of_ev_forces_equals_the_originals_of_the_files_kcal_forces(recipe_batch):
    backbone, batch, kcal = recipe_batch
    assert backbone.force_encoding_scale == KCAL_PER_MOL_PER_EV
    with torch.no_grad():  # random weights and bias of the layer's size: every degree and the bias count
        backbone.force_embedding.weight.normal_()
        backbone.force_embedding.bias.normal_()
        ours = dens_node_features(
            batch, backbone.force_embedding, backbone.lmax, force_encoding_scale=backbone.force_encoding_scale
        )
        weak = dens_node_features(batch, backbone.force_embedding, backbone.lmax, force_encoding_scale=1.0)
    expected = original_force_encoding(
        kcal, batch.noise_mask, backbone.force_embedding.weight, backbone.force_embedding.bias
    )
    assert bool(batch.noise_mask.any()) and not bool(batch.noise_mask.all())
    # The stored eV/Å forces are the file's values times 1/23.06 rounded to float32 (1 ulp), the
    # scale gives them back (1 ulp more), then a handful of elementwise ops and one weight times
    # coefficient plus bias, in another order: ELEMENTWISE_ULPS of the largest feature.
    assert_ulps(ours, expected, ELEMENTWISE_ULPS, what="scaled encoding vs the original's")
    # Negative control: eV/Å encoded as they are (scale 1) is 23x weaker on corrupted atoms.
    corrupted = batch.noise_mask
    assert float((weak - expected)[corrupted].abs().max()) > f32_tol(expected.abs().max(), MUST_DIFFER_ULPS)
    # Clean atoms get the bias alone, in both.
    assert_ulps(ours[~corrupted], expected[~corrupted], 0, what="clean atoms")
