"""Every shipped config parses, validates and builds (at tiny size), with the published DeNS settings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from fairchem.core.common.utils import load_config

from fairchem_dens.core.encoding import KCAL_PER_MOL_PER_EV
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.resources import configs_dir
from fairchem_dens.testing import TINY_EQV2_BACKBONE, TINY_ESCN_BACKBONE, TINY_ESEN_BACKBONE, build_model
from fairchem_dens.testing.tolerances import F64_REL

CONFIGS = configs_dir()  # the shipped package data (the checkout's configs/ links to it)
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yml") if not p.name.startswith("_"))

# Published settings (docs/algorithm.md#oc20-and-oc22-recipes):
# lr, epochs, warmup, lambda_E, lambda_F, prob, std, corrupt, lambda_D, layers, lmax, mmax.
PUBLISHED = {
    "equiformer_dens_v2_N@12_L@6_M@2_lr@2e-4_epochs@12_std@0.1_gpus@16.yml": (
        2e-4,
        12,
        0.1,
        2,
        100,
        0.5,
        0.1,
        0.5,
        10,
        12,
        6,
        2,
    ),
    "equiformer_dens_v2_N@12_L@6_M@2_lr@4e-4_epochs@30_std@0.1_gpus@32.yml": (
        4e-4,
        30,
        0.1,
        2,
        100,
        0.5,
        0.1,
        0.5,
        10,
        12,
        6,
        2,
    ),
    "equiformer_v2_dens_N@20_L@6_M@3_lr@4e-4_epochs@2_std@0.1_dens-relax-data-only.yml": (
        4e-4,
        2,
        0.01,
        4,
        100,
        0.125,
        0.1,
        0.25,
        15,
        20,
        6,
        3,
    ),
}
SIZE_KEYS = (
    "num_layers",
    "sphere_channels",
    "attn_hidden_channels",
    "num_heads",
    "attn_alpha_channels",
    "attn_value_channels",
    "ffn_hidden_channels",
    "lmax_list",
    "mmax_list",
    "grid_resolution",
    "edge_channels",
    "num_distance_basis",
    "max_neighbors",
    "max_radius",
)


ESCN_SIZE_KEYS = (
    "num_layers",
    "sphere_channels",
    "hidden_channels",
    "edge_channels",
    "lmax_list",
    "mmax_list",
    "num_sphere_samples",
    "max_neighbors",
    "cutoff",
)


def full_config(path: Path) -> dict:
    config, _warnings, errors = load_config(path)
    assert not errors, errors
    return config


def training_configs():
    return [p for p in SHIPPED if "trainer" in full_config(p)]


def test_every_published_recipe_is_shipped():
    names = {p.name for p in SHIPPED}
    assert set(PUBLISHED) <= names


@pytest.mark.parametrize("path", training_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_validates_and_builds_at_tiny_size(path):
    config = full_config(path)
    optim = config.get("optim", {})
    if "use_denoising_pos" in optim:
        DeNSConfig.from_optim(optim)  # raises on any bad key
        # dotted paths, so a fresh `fairchem` process (or a SLURM job) finds our classes
        assert config["trainer"].startswith("fairchem_dens.")
        if optim[
            "use_denoising_pos"
        ]:  # a config with DeNS off (a two-step recipe's step 2) may train fairchem's own model
            assert config["model"]["backbone"]["model"].startswith("fairchem_dens.")
        assert config["evaluation_metrics"]["primary_metric"]
    model_config = copy.deepcopy(config["model"])
    name = model_config["backbone"]["model"].lower()
    if "esen" in name:
        tiny = {k: v for k, v in TINY_ESEN_BACKBONE.items() if k not in ("act_type", "mlp_type")}
    elif "escn" in name:
        tiny = {key: TINY_ESCN_BACKBONE[key] for key in ESCN_SIZE_KEYS}
    else:
        tiny = {key: TINY_EQV2_BACKBONE[key] for key in SIZE_KEYS}
    model_config["backbone"].update(tiny)
    model = build_model(model_config)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_hyperparameters(name):
    (path,) = [p for p in SHIPPED if p.name == name]
    config = full_config(path)
    lr, epochs, warmup, lam_e, lam_f, prob, std, corrupt, lam_d, layers, lmax, mmax = PUBLISHED[name]
    optim, backbone = config["optim"], config["model"]["backbone"]
    dens = DeNSConfig.from_optim(optim)
    assert optim["lr_initial"] == lr and optim["max_epochs"] == epochs
    assert optim["scheduler_params"]["warmup_epochs"] == warmup
    losses = {list(entry)[0]: list(entry.values())[0] for entry in config["loss_functions"]}
    assert losses["energy"]["coefficient"] == lam_e and losses["forces"]["coefficient"] == lam_f
    assert losses["energy"]["fn"] == "mae" and losses["forces"]["fn"] == "l2mae"
    assert (dens.prob, dens.std, dens.corrupt_ratio, dens.coefficient) == (prob, std, corrupt, lam_d)
    assert dens.fixed_noise_std and dens.selection == "batch" and not dens.all_atoms
    assert dens.relaxation_only == ("all-md" in str(path))
    assert (backbone["num_layers"], backbone["lmax_list"], backbone["mmax_list"]) == (layers, [lmax], [mmax])
    assert backbone["max_radius"] == 12.0 and backbone["max_neighbors"] == 20
    assert backbone["sphere_channels"] == 128 and backbone["ffn_hidden_channels"] == 128
    assert backbone["use_force_encoding"] and not backbone["use_noise_schedule_sigma_encoding"]
    assert optim["ema_decay"] == 0.999 and optim["clip_grad_norm"] == 100
    assert optim["batch_size"] == 4 and config["evaluation_metrics"]["primary_metric"] == "forces_mae"
    norm = config["dataset"]["train"]["transforms"]["normalizer"]
    assert norm["energy"]["mean"] == pytest.approx(-0.7554450631141663, rel=F64_REL)
    assert norm["forces"]["rmsd"] == pytest.approx(2.887317180633545, rel=F64_REL)


def test_published_escn_recipe():
    (path,) = [p for p in SHIPPED if p.name == "escn_dens_N@12_L@6_M@2_epochs@20.yml"]
    config = full_config(path)
    optim, backbone = config["optim"], config["model"]["backbone"]
    dens = DeNSConfig.from_optim(optim)
    assert (dens.prob, dens.std, dens.corrupt_ratio, dens.coefficient) == (0.5, 0.15, 0.5, 10)
    assert dens.fixed_noise_std and dens.selection == "batch"
    assert (backbone["num_layers"], backbone["lmax_list"], backbone["mmax_list"]) == (12, [6], [2])
    assert (backbone["cutoff"], backbone["max_neighbors"], backbone["hidden_channels"]) == (12.0, 20, 256)
    assert backbone["basis_width_scalar"] == 2.0 and backbone["num_sphere_samples"] == 128
    assert optim["lr_initial"] == 8e-4 and optim["max_epochs"] == 20 and optim["batch_size"] == 6
    assert optim["optimizer_params"] == {"amsgrad": True, "weight_decay": 0.01}
    params = optim["scheduler_params"]
    assert params["lambda_type"] == "multistep" and params["decay_epochs"] == [11.7, 15, 18.3]
    assert params["decay_rate"] == 0.3 and params["warmup_epochs"] == 0.01


def test_published_oc22_recipe():
    (path,) = [p for p in SHIPPED if p.name == "equiformer_v2_dens_N@18_L@6_M@2_e@4_f@100_std@0.15.yml"]
    config = full_config(path)
    optim, backbone = config["optim"], config["model"]["backbone"]
    dens = DeNSConfig.from_optim(optim)
    assert (dens.prob, dens.std, dens.corrupt_ratio, dens.coefficient, dens.std_high) == (0.5, 0.15, 0.5, 25, 0.2)
    losses = {list(entry)[0]: list(entry.values())[0] for entry in config["loss_functions"]}
    assert losses["energy"]["coefficient"] == 4 and losses["forces"]["coefficient"] == 100
    assert (backbone["num_layers"], backbone["lmax_list"], backbone["mmax_list"]) == (18, [6], [2])
    assert backbone["drop_path_rate"] == 0.1 and backbone["enforce_max_neighbors_strictly"] is False
    assert optim["lr_initial"] == 2e-4 and optim["max_epochs"] == 6 and optim["clip_grad_norm"] == 50
    assert config["task"]["prediction_dtype"] == "float32"
    assert config["evaluation_metrics"]["primary_metric"] == "energy_mae"
    train = config["dataset"]["train"]
    assert train["format"] == "oc22_lmdb" and "element_references" in train["transforms"]
    assert train["transforms"]["normalizer"]["energy"]["rmsd"] == pytest.approx(25.119809935106424, rel=F64_REL)
    assert train["transforms"]["normalizer"]["forces"]["rmsd"] == pytest.approx(0.14759646356105804, rel=F64_REL)


MD17_TABLE = {  # docs/algorithm.md#md17-recipe: lr, epochs, batch, w_E, w_F for L_max 2 and 3
    2: {
        "aspirin": (5e-4, 1500, 8, 1, 80),
        "benzene": (1e-4, 1500, 8, 1, 80),
        "ethanol": (5e-4, 1500, 8, 1, 80),
        "malonaldehyde": (5e-4, 1500, 8, 1, 100),
        "naphthalene": (5e-4, 1500, 8, 2, 20),
        "salicylic_acid": (5e-4, 1500, 8, 1, 80),
        "toluene": (5e-4, 1500, 8, 1, 80),
        "uracil": (5e-4, 1500, 8, 1, 20),
    },
    3: {
        "aspirin": (2e-4, 2000, 5, 1, 80),
        "benzene": (1e-4, 1500, 8, 1, 80),
        "ethanol": (2e-4, 2000, 5, 1, 80),
        "malonaldehyde": (2e-4, 2000, 5, 1, 100),
        "naphthalene": (2e-4, 2000, 5, 2, 20),
        "salicylic_acid": (2e-4, 2000, 5, 1, 80),
        "toluene": (2e-4, 2000, 5, 1, 80),
        "uracil": (2e-4, 2000, 5, 1, 20),
    },
}


# the published per-molecule recipes (the xtb_* small-data recipes and paper_md17_conservative, sized
# for a CPU, are ours: tested in test_md17_recipe and below)
MD17_RECIPES = sorted(
    p for p in CONFIGS.glob("md17/*/**/*.yml") if "model" not in p.stem and not p.stem.startswith(("xtb_", "paper_"))
)


def test_every_md17_recipe_is_checked():
    assert len(MD17_RECIPES) == 3 * 8  # EquiformerV2 lmax 2 and 3, eSCN; eight molecules each


@pytest.mark.parametrize("path", MD17_RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_md17_recipes(path):
    config = full_config(path)
    optim, backbone = config["optim"], config["model"]["backbone"]
    dens = DeNSConfig.from_optim(optim)
    molecule = path.stem
    toluene = molecule == "toluene"
    assert dens.selection == "structure" and dens.coefficient_schedule == "linear_decay"
    assert dens.loss_form == "separate_means"  # docs/algorithm.md#md17-recipe
    assert (dens.prob, dens.std) == ((0.125, 0.025) if toluene else (0.25, 0.05))
    assert (dens.corrupt_ratio, dens.coefficient, dens.fixed_noise_std) == (0.25, 5.0, True)
    lmax = 3 if "lmax3" in str(path) else 2
    lr, epochs, batch, w_e, w_f = MD17_TABLE[lmax][molecule]
    assert (optim["lr_initial"], optim["max_epochs"], optim["batch_size"]) == (lr, epochs, batch)
    losses = {list(entry)[0]: list(entry.values())[0] for entry in config["loss_functions"]}
    assert (losses["energy"]["coefficient"], losses["forces"]["coefficient"]) == (w_e, w_f)
    assert optim["optimizer_params"]["weight_decay"] == 1e-6 and "ema_decay" not in optim
    assert "clip_grad_norm" not in optim and optim["scheduler_params"]["warmup_epochs"] == 10
    assert optim["scheduler_params"]["lr_min_factor"] * lr == pytest.approx(1e-6, rel=F64_REL)
    # isolated molecules in md17-to-lmdb's 50 Å box: images are never within the 5 Å cutoff
    assert backbone["lmax_list"] == [lmax] and backbone.get("max_radius", backbone.get("cutoff")) == 5.0
    assert backbone.get("drop_path_rate", 0.0) == 0.0 and backbone.get("alpha_drop", 0.0) == 0.0
    assert config["dataset"]["train"]["src"].endswith(f"{molecule}/train")
    # forces divided by the training-set energy std, as the MD17 code does
    assert config["dataset"]["train"]["transforms"]["normalizer"]["fit"]["targets"]["forces"] == {
        "mean": 0.0,
        "rmsd": "energy",
    }
    # forces encoded in kcal/mol/Å, the unit of the MD17 files the original code encodes
    assert backbone["force_encoding_scale"] == KCAL_PER_MOL_PER_EV


@pytest.mark.parametrize(
    "path",
    sorted(
        {
            *CONFIGS.glob("md17/esen/*.yml"),
            CONFIGS / "md17" / "xtb_small_data.yml",
            CONFIGS / "fairchem2" / "dens_md17_conservative.yml",
        }
    ),
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_every_md17_recipe_with_a_force_encoding_encodes_kcal_per_mol(path):
    config = full_config(path) if "fairchem2" not in str(path) else yaml.safe_load(path.read_text())
    model = config["model"] if "fairchem2" not in str(path) else config["runner"]["train_eval_unit"]["model"]
    backbone = model.get("backbone", {})
    if not str(backbone.get("model", "")).startswith("fairchem_dens"):
        assert "force_encoding_scale" not in backbone  # a plain backbone (two-step recipe, base file)
        return
    assert backbone["force_encoding_scale"] == KCAL_PER_MOL_PER_EV


def test_paper_md17_conservative_recipe_has_the_md17_dens_settings_on_a_conservative_block_head():
    config = full_config(CONFIGS / "md17" / "esen" / "paper_md17_conservative.yml")
    optim, model = config["optim"], config["model"]
    dens = DeNSConfig.from_optim(optim)
    # the ethanol row of the published MD17 table (docs/algorithm.md#md17-recipe), L_max 2
    lr, _epochs, batch, w_e, w_f = MD17_TABLE[2]["ethanol"]
    assert (dens.selection, dens.coefficient_schedule, dens.loss_form) == (
        "structure",
        "linear_decay",
        "separate_means",
    )
    assert (dens.prob, dens.std, dens.corrupt_ratio, dens.coefficient, dens.fixed_noise_std) == (
        0.25,
        0.05,
        0.25,
        5.0,
        True,
    )
    assert (optim["lr_initial"], optim["batch_size"], optim["optimizer"]) == (lr, batch, "AdamW")
    assert (
        optim["optimizer_params"]["weight_decay"] == 1e-6 and "ema_decay" not in optim and "clip_grad_norm" not in optim
    )
    assert optim["scheduler_params"]["warmup_epochs"] == 10
    assert optim["scheduler_params"]["lr_min_factor"] * lr == pytest.approx(1e-6, rel=F64_REL)
    losses = {list(entry)[0]: list(entry.values())[0] for entry in config["loss_functions"]}
    assert (losses["energy"]["coefficient"], losses["forces"]["coefficient"]) == (w_e, w_f)
    # conservative, with a whole block as the noise head and the force encoding on
    assert model["heads"]["energy"]["module"].endswith("DeNSeSENConservativeHead")
    assert model["heads"]["energy"]["noise_head"] == "block" and model["backbone"]["use_force_encoding"] is True
    assert config["dataset"]["train"]["transforms"]["normalizer"]["fit"]["targets"]["forces"] == {
        "mean": 0.0,
        "rmsd": "energy",
    }


# fairchem 1.10's configs/omat24/mptrj/eqV2_*_dens_mptrj.yml (docs/algorithm.md#mptrj-recipes):
# layers, lmax, mmax, lambda_E, batch
MPTRJ = {
    "eqV2_31M_dens_mptrj.yml": (8, 4, 2, 5, 4),
    "eqV2_86M_dens_mptrj.yml": (10, 6, 4, 2.5, 8),
    "eqV2_153M_dens_mptrj.yml": (20, 6, 3, 2.5, 8),
}


@pytest.mark.parametrize("name", sorted(MPTRJ))
def test_mptrj_recipes_really_denoise_with_the_published_values(name):
    config = full_config(CONFIGS / "mptrj" / "equiformer_v2" / name)
    layers, lmax, mmax, lambda_e, batch = MPTRJ[name]
    backbone, optim = config["model"]["backbone"], config["optim"]
    assert config["trainer"] == "fairchem_dens.trainers.dens.DeNSTrainer"  # not equiformerv2_forces
    assert (backbone["num_layers"], backbone["lmax_list"], backbone["mmax_list"]) == (layers, [lmax], [mmax])
    assert (backbone["max_radius"], backbone["max_neighbors"], backbone["use_pbc_single"]) == (12.0, 20, True)
    assert (backbone["sphere_channels"], backbone["attn_hidden_channels"], backbone["ffn_hidden_channels"]) == (
        128,
        64,
        128,
    )
    losses = {next(iter(e)): next(iter(e.values())) for e in config["loss_functions"]}
    assert {k: (v["fn"], v["coefficient"]) for k, v in losses.items()} == {
        "energy": ("per_atom_mae", lambda_e),
        "forces": ("l2mae", 20),
        "stress_isotropic": ("mae", 5),
        "stress_anisotropic": ("mae", 5),
    }
    assert (optim["lr_initial"], optim["max_epochs"], optim["batch_size"], optim["ema_decay"]) == (
        2e-4,
        150,
        batch,
        0.999,
    )
    dens = DeNSConfig.from_optim(optim)
    assert (dens.prob, dens.std, dens.corrupt_ratio, dens.coefficient) == (0.5, 0.1, None, 10)
    assert config["model"]["heads"]["stress"]["module"] == "rank2_symmetric_head"  # zeroes nothing
    assert config["logger"] == "tensorboard"
    train = config["dataset"]["train"]
    assert train["a2g_args"] == {"r_energy": True, "r_forces": True, "r_stress": True}
    assert train["format"] == "fairchem_dens.datasets.ase_db.DeNSAseDBDataset"


def test_mptrj_31m_has_the_released_size():
    config = full_config(CONFIGS / "mptrj" / "equiformer_v2" / "eqV2_31M_dens_mptrj.yml")
    model = build_model(config["model"])
    # docs/algorithm.md#mptrj-recipes: 34.34M parameters in fairchem's port, noise and stress heads included
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(34.34, abs=0.01)  # the paper's 2 decimals


def test_omat24_variant_has_equiformer_v3s_dens_settings():
    config = full_config(CONFIGS / "mptrj" / "equiformer_v2" / "eqV2_31M_dens_omat24_eqv3_settings.yml")
    dens = DeNSConfig.from_optim(config["optim"])
    assert (dens.std, dens.corrupt_ratio, dens.strict_max_ratio, dens.max_force_norm, dens.coefficient) == (
        0.025,
        0.5,
        0.75,
        2.5,
        1,
    )


def test_esen_30m_has_the_published_size():
    """eSEN-30M-MP: 30,085,121 parameters (matbench-discovery's model card), backbone + esen_mlp_efs_head."""
    config = full_config(CONFIGS / "mptrj" / "esen" / "esen_30M_conservative_mptrj.yml")
    model = build_model(config["model"])
    assert sum(p.numel() for p in model.parameters()) == 30_085_121


def test_esen_two_step_recipe():
    direct = full_config(CONFIGS / "mptrj" / "esen" / "esen_30M_dens_direct_mptrj.yml")
    conservative = full_config(CONFIGS / "mptrj" / "esen" / "esen_30M_conservative_mptrj.yml")
    assert (direct["optim"]["max_epochs"], conservative["optim"]["max_epochs"]) == (70, 30)
    dens = DeNSConfig.from_optim(direct["optim"])
    assert (dens.prob, dens.std, dens.corrupt_ratio, dens.coefficient) == (0.5, 0.1, None, 10)
    assert "use_denoising_pos" not in conservative["optim"] and conservative["trainer"] == "mlip_trainer"
    sizes = {k: v for k, v in direct["model"]["backbone"].items() if k not in ("model", "use_force_encoding")}
    assert sizes == {
        k: v for k, v in conservative["model"]["backbone"].items() if k not in ("model", "regress_stress")
    }  # one backbone, two stages
