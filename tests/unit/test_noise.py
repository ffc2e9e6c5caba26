"""Statistics and validation of the pure DeNS sampling code."""

from __future__ import annotations

import math

import pytest
import torch

from fairchem_dens.core.corruption import (
    DECISION_STREAM,
    NOISE_STREAM,
    sample_corruption,
    select_structures,
    sigma_ladder,
    step_generator,
)
from fairchem_dens.core.settings import DeNSConfig, DeNSConfigError
from fairchem_dens.testing.tolerances import ELEMENTWISE_ULPS, EPS32, F64_REL, assert_ulps


def optim(**params):
    base = {"prob": 0.5, "fixed_noise_std": True, "std": 0.1}
    base.update(params)
    return {"use_denoising_pos": True, "denoising_pos_params": base, "denoising_pos_coefficient": 10}


def config(**params) -> DeNSConfig:
    return DeNSConfig.from_optim(optim(**params))


def big_batch(structures=400, atoms=20, fixed_per_structure=5):
    batch_index = torch.arange(structures).repeat_interleave(atoms)
    fixed = torch.zeros(structures, atoms, dtype=torch.int32)
    fixed[:, :fixed_per_structure] = 1
    return batch_index, fixed.view(-1)


def draw(cfg, step=0, rank=0, md=None, structures=400, atoms=20):
    batch_index, fixed = big_batch(structures, atoms)
    return sample_corruption(
        cfg,
        batch_index,
        fixed,
        step_generator(0, step, DECISION_STREAM),
        step_generator(0, step, NOISE_STREAM, rank),
        md=md,
        num_structures=structures,
    ), fixed


# ------------------------------------------------------------------ statistics
def test_batch_selection_frequency_matches_prob():
    cfg = config(prob=0.3)
    chosen = [bool(select_structures(cfg, 4, step_generator(1, s, DECISION_STREAM))[0]) for s in range(4000)]
    assert abs(sum(chosen) / 4000 - 0.3) < 0.03


def test_batch_selection_is_all_or_nothing_and_rank_independent():
    cfg = config(prob=0.5, corrupt_ratio=None)
    for step in range(20):
        masks = [draw(cfg, step=step, rank=r, structures=8)[0] for r in range(3)]
        selected = [m.selected for m in masks]
        assert all(torch.equal(selected[0], s) for s in selected)  # same decision on every rank
        assert selected[0].all() or not selected[0].any()


def test_noise_differs_between_ranks_but_is_reproducible():
    cfg = config(prob=1.0)
    a, _ = draw(cfg, step=3, rank=0)
    b, _ = draw(cfg, step=3, rank=1)
    again, _ = draw(cfg, step=3, rank=0)
    assert not torch.equal(a.noise, b.noise)
    assert torch.equal(a.noise, again.noise)


def test_structure_selection_fraction():
    cfg = config(prob=0.25, selection="structure", corrupt_ratio=None)
    corruption, _ = draw(cfg, structures=4000, atoms=2)
    assert abs(corruption.selected.float().mean().item() - 0.25) < 0.03


def test_partial_mask_fraction_and_fixed_atoms_never_corrupted():
    cfg = config(prob=1.0, corrupt_ratio=0.5)
    corruption, fixed = draw(cfg)
    assert not corruption.mask[fixed == 1].any()
    free_fraction = corruption.mask[fixed == 0].float().mean().item()
    assert abs(free_fraction - 0.5) < 0.03
    # noise is zero exactly where the mask is off
    assert torch.all(corruption.noise[~corruption.mask] == 0)
    assert torch.all(corruption.noise[corruption.mask].abs().sum(-1) > 0)


def test_all_atoms_corrupts_fixed_atoms_too():
    cfg = config(prob=1.0, corrupt_ratio=None, all_atoms=True)
    corruption, fixed = draw(cfg, structures=10)
    assert corruption.mask.all()


def test_fixed_noise_scale_and_target():
    cfg = config(prob=1.0, std=0.2)
    corruption, _ = draw(cfg)
    std = corruption.noise[corruption.mask].std().item()
    assert abs(std - 0.2) < 0.01
    assert_ulps(corruption.target, corruption.noise / 0.2, ELEMENTWISE_ULPS, what="target")
    assert cfg.target_std == 0.2


def test_sigma_ladder_is_geometric_with_both_ends():
    ladder = sigma_ladder(0.01, 0.5, 50)
    assert ladder.dtype == torch.float32 and ladder.numel() == 50
    assert math.isclose(ladder[0].item(), 0.01, rel_tol=ELEMENTWISE_ULPS * EPS32)
    assert math.isclose(ladder[-1].item(), 0.5, rel_tol=ELEMENTWISE_ULPS * EPS32)
    ratios = ladder[1:] / ladder[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=2 * ELEMENTWISE_ULPS * EPS32)  # two rungs' error


def test_multiscale_one_sigma_per_structure_and_target_uses_std_high():
    cfg = config(prob=1.0, fixed_noise_std=False, std=None, std_low=0.01, std_high=0.5, num_steps=50)
    corruption, _ = draw(cfg, structures=200)
    sigmas = corruption.sigmas.view(200, 20)
    assert torch.all(sigmas == sigmas[:, :1])  # constant within a structure
    ladder = sigma_ladder(0.01, 0.5, 50)
    assert all((ladder == s).any() for s in sigmas[:, 0])  # rungs drawn by index
    assert sigmas[:, 0].unique().numel() > 20  # many rungs used
    assert cfg.target_std == 0.5
    assert_ulps(corruption.target, corruption.noise / 0.5, ELEMENTWISE_ULPS, what="target")


def test_relaxation_only_never_corrupts_md_frames():
    cfg = config(prob=1.0, relaxation_only=True)
    md = torch.tensor([0, 1] * 200)
    corruption, _ = draw(cfg, md=md)
    atom_md = md.repeat_interleave(20).bool()
    assert not corruption.mask[atom_md].any()
    assert corruption.mask[~atom_md].any()


def test_relaxation_only_without_md_flag_fails():
    with pytest.raises(DeNSConfigError, match="relaxation_only"):
        draw(config(prob=1.0, relaxation_only=True))


def test_disabled_config_never_corrupts():
    cfg = DeNSConfig.from_optim({"use_denoising_pos": False})
    corruption, _ = draw(cfg)
    assert not corruption.active


def test_linear_decay_of_the_coefficient():
    cfg = config(coefficient_schedule="linear_decay")
    assert cfg.coefficient_at(0, 10) == 10
    assert math.isclose(cfg.coefficient_at(2.5, 10), 7.5, rel_tol=F64_REL)
    assert cfg.coefficient_at(10, 10) == 0
    assert config().coefficient_at(9, 10) == 10


def test_yaml_capitalised_none_is_null():
    cfg = config(std_low="None", std_high="None", corrupt_ratio="None")
    assert cfg.corrupt_ratio is None and cfg.std_low is None


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"probability": 0.5},
            r"unknown DeNS key optim.denoising_pos_params.probability \(nearest known key: "
            r"optim.denoising_pos_params.prob\)",
        ),
        ({"prob": 1.5}, r"prob must be a probability in \[0, 1\]"),
        ({"prob": -0.1}, r"prob must be a probability"),
        ({"corrupt_ratio": 2.0}, r"corrupt_ratio must be a probability"),
        ({"std": 0.0}, "std must be a positive number"),
        ({"std": -1}, "std must be a positive number"),
        ({"std": None}, "std is missing"),
        ({"fixed_noise_std": False, "std_low": 0.5, "std_high": 0.1, "num_steps": 5}, "std_low .* must not exceed"),
        ({"fixed_noise_std": False, "std_low": 0.0, "std_high": 0.1, "num_steps": 5}, "std_low must be a positive"),
        (
            {"fixed_noise_std": False, "std_low": 0.1, "std_high": 0.5, "num_steps": 0},
            "num_steps must be a positive integer",
        ),
        ({"fixed_noise_std": False, "std_low": 0.1, "num_steps": 5}, "std_high is missing"),
        ({"selection": "atom"}, "selection must be 'batch' or 'structure'"),
        ({"coefficient_schedule": "cosine"}, "coefficient_schedule must be"),
        ({"fixed_noise_std": "yes"}, "fixed_noise_std must be true or false"),
    ],
)
def test_invalid_params_name_the_key(params, message):
    with pytest.raises(DeNSConfigError, match=message):
        config(**params)


@pytest.mark.parametrize("key", ["denoising_pos_parmas", "use_denoising", "denoising_coefficient", "dens_params"])
def test_an_optim_key_meant_for_dens_but_misspelt_is_refused_naming_the_nearest(key):
    with pytest.raises(DeNSConfigError, match=rf"unknown DeNS key optim\.{key} \(nearest known key: optim\."):
        DeNSConfig.from_optim({**optim(), key: 1})


def test_fairchems_own_optim_keys_pass_and_a_dens_block_holds_only_dens_keys():
    fairchem_keys = {"batch_size": 4, "lr_initial": 1e-3, "max_epochs": 2, "eval_every": 10}
    assert DeNSConfig.from_optim({**optim(), **fairchem_keys}).enabled
    section = "runner.train_eval_unit.dens"
    with pytest.raises(DeNSConfigError, match=rf"unknown DeNS key {section}\.batch_size"):
        DeNSConfig.from_optim({**optim(), "batch_size": 4}, section=section, only_dens_keys=True)
    # every message names the key where that config holds it
    with pytest.raises(DeNSConfigError, match=rf"^{section}\.denoising_pos_params\.prob must be a probability"):
        DeNSConfig.from_optim(optim(prob=1.5), section=section, only_dens_keys=True)


def test_missing_fixed_noise_std_is_an_error():
    params = {"prob": 0.5, "std": 0.1}
    with pytest.raises(DeNSConfigError, match="fixed_noise_std is missing"):
        DeNSConfig.from_optim(
            {"use_denoising_pos": True, "denoising_pos_params": params, "denoising_pos_coefficient": 1}
        )


def test_missing_coefficient_and_switch_are_errors():
    with pytest.raises(DeNSConfigError, match="denoising_pos_coefficient is missing"):
        DeNSConfig.from_optim({"use_denoising_pos": True, "denoising_pos_params": optim()["denoising_pos_params"]})
    with pytest.raises(DeNSConfigError, match="use_denoising_pos is missing"):
        DeNSConfig.from_optim({"denoising_pos_params": optim()["denoising_pos_params"]})
    with pytest.raises(DeNSConfigError, match="denoising_pos_coefficient must be a number"):
        DeNSConfig.from_optim({**optim(), "denoising_pos_coefficient": -1})


def test_sibling_coefficient_overrides_the_field_inside_params():
    opt = optim(denoising_pos_coefficient=3)
    assert DeNSConfig.from_optim(opt).coefficient == 10
    del opt["denoising_pos_coefficient"]
    assert DeNSConfig.from_optim(opt).coefficient == 3


def test_every_output_gets_a_role():
    from fairchem_dens.core.roles import output_roles

    # fairchem's output_targets for an MPtrj-style config: stress decomposed into irreps 0 and 2
    targets = {
        "energy": {"level": "system"},
        "forces": {"level": "atom"},
        "stress": {"level": "system", "decomposition": {}},
        "stress_isotropic": {"level": "system", "parent": "stress"},
        "stress_anisotropic": {"level": "system", "parent": "stress"},
        "charges": {"level": "atom"},
    }
    assert output_roles(targets, None) == {
        "energy": "original",
        "forces": "replaced",
        "stress": "excluded",
        "stress_isotropic": "excluded",
        "stress_anisotropic": "excluded",
        "charges": "excluded",
    }
    roles = output_roles(targets, {"energy": "excluded", "charges": "original"})
    assert (roles["energy"], roles["charges"]) == ("excluded", "original")


# ------------------------------------------------------------------ skip filters (EquiformerV3)
def filters(**params):
    base = {"prob": 1.0, "fixed_noise_std": True, "std": 0.1}
    return DeNSConfig.from_optim(
        {"use_denoising_pos": True, "denoising_pos_coefficient": 1.0, "denoising_pos_params": {**base, **params}}
    )


def draw_filtered(config, batch_index, step, forces=None, stress=None, fixed=None):
    fixed = torch.zeros(batch_index.numel()) if fixed is None else fixed
    return sample_corruption(
        config,
        batch_index,
        fixed,
        step_generator(0, step, DECISION_STREAM),
        step_generator(0, step, NOISE_STREAM),
        forces=forces,
        stress=stress,
    )


def test_min_num_atoms_and_force_filters():
    sizes = torch.tensor([2, 5, 8, 8])
    batch_index = torch.repeat_interleave(torch.arange(4), sizes)
    forces = torch.zeros(int(sizes.sum()), 3)
    forces[7, 0] = 3.0  # structure 2: one atom above 2.5 eV/Å
    forces[15:23, 1] = 0.2  # structure 3: |sum F| = 1.6 eV/Å, every |F_i| small
    config = filters(min_num_atoms=3, max_force_norm=2.5, max_mean_force_norm=1.0)
    corruption = draw_filtered(config, batch_index, 1, forces=forces)
    assert corruption.selected.tolist() == [False, True, False, False]
    assert torch.equal(corruption.mask, corruption.selected[batch_index])
    with pytest.raises(DeNSConfigError, match="need the batch's `forces`"):
        draw_filtered(config, batch_index, 1)


def test_max_stress_norm_filter():
    batch_index = torch.repeat_interleave(torch.arange(3), 4)
    stress = torch.zeros(3, 3, 3)
    stress[1, 0, 0] = 0.05
    corruption = draw_filtered(filters(max_stress_norm=0.01), batch_index, 1, stress=stress)
    assert corruption.selected.tolist() == [True, False, True]
    with pytest.raises(DeNSConfigError, match="max_stress_norm is set but the batch has no `stress`"):
        draw_filtered(filters(max_stress_norm=0.01), batch_index, 1)


def test_strict_max_ratio_statistics():
    # 2000 structures of 8 free atoms, corrupt_ratio 0.5, cap 0.75: a structure stays corrupted
    # when 1..6 of its 8 atoms are drawn (0 atoms: nothing to corrupt; 7-8: above the cap).
    n, structures = 8, 2000
    batch_index = torch.repeat_interleave(torch.arange(structures), n)
    corruption = draw_filtered(filters(corrupt_ratio=0.5, strict_max_ratio=0.75), batch_index, 3)
    counts = torch.zeros(structures).index_add_(0, batch_index, corruption.mask.float())
    assert counts.max() <= 6
    capped = (counts == 0) & corruption.selected.logical_not()
    expected = (math.comb(8, 7) + math.comb(8, 8)) / 2**8  # P(k > 6) = 9/256
    assert float(capped.float().mean()) == pytest.approx(expected, abs=4 * math.sqrt(expected / structures))
    # the cap only removes structures: every other draw is what the uncapped sampler makes
    free = draw_filtered(filters(corrupt_ratio=0.5), batch_index, 3)
    kept = corruption.selected[batch_index]
    assert torch.equal(corruption.mask[kept], free.mask[kept])
    assert torch.equal(corruption.noise[kept], free.noise[kept])


def test_filters_draw_nothing_so_resumed_jobs_draw_the_same():
    batch_index = torch.repeat_interleave(torch.arange(6), 5)
    forces = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    with_filters = draw_filtered(filters(corrupt_ratio=0.5, max_force_norm=2.0), batch_index, 9, forces=forces)
    again = draw_filtered(filters(corrupt_ratio=0.5, max_force_norm=2.0), batch_index, 9, forces=forces)
    without = draw_filtered(filters(corrupt_ratio=0.5), batch_index, 9)
    assert torch.equal(with_filters.noise, again.noise)
    allowed = with_filters.selected[batch_index]
    assert torch.equal(with_filters.noise[allowed], without.noise[allowed])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"strict_max_ratio": 0.75}, "strict_max_ratio caps the corrupted fraction of partial corruption"),
        ({"corrupt_ratio": 0.5, "strict_max_ratio": 1.5}, r"strict_max_ratio must be a probability"),
        ({"min_num_atoms": 0}, r"min_num_atoms must be a positive integer"),
        ({"max_force_norm": -1.0}, r"max_force_norm must be a positive number \(eV/Å\)"),
        ({"max_stress_norm": "big"}, r"max_stress_norm must be a positive number"),
        ({"early_epochs": 0}, r"early_epochs must be a positive number"),
        ({"coefficient_min_factor": 0.1}, r"coefficient_min_factor is the floor of the linear decay"),
        (
            {"coefficient_min_factor": 2.0, "coefficient_schedule": "linear_decay"},
            r"coefficient_min_factor must be a probability",
        ),
    ],
)
def test_filter_settings_are_validated(params, message):
    with pytest.raises(DeNSConfigError, match=message):
        filters(**params)


def test_early_epochs_and_decay_floor():
    config = filters(early_epochs=2, coefficient_schedule="linear_decay", coefficient_min_factor=0.25)
    assert [config.active_in_epoch(e) for e in range(4)] == [True, True, False, False]
    assert config.coefficient_at(0.0, 10) == pytest.approx(1.0, rel=F64_REL)
    assert config.coefficient_at(5.0, 10) == pytest.approx(0.625, rel=F64_REL)
    assert config.coefficient_at(10.0, 10) == pytest.approx(0.25, rel=F64_REL)
