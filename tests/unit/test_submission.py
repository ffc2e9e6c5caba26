"""Submission files for the OC20/OC22 evaluation server (fairchem_dens.submission).

Per-split inputs are written the way fairchem 1.10 writes them: ``save_results``
(S2EF/IS2RE ``--mode predict``) and ``run_relaxations`` with ``write_pos`` (IS2RS):
ids sorted by ``np.unique``, per-system energies, free-atom forces concatenated,
``chunk_idx = cumsum(counts)[:-1]``, float16 unless float32 was asked for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import fairchem_dens
from fairchem_dens.resources import configs_dir
from fairchem_dens.submission import (
    SPLITS,
    TASK_KEYS,
    SubmissionError,
    SubmissionWarning,
    build_submission,
    detect_total_energy,
)
from fairchem_dens.testing.tolerances import F32_STORAGE_REL

CONFIGS = configs_dir()  # the shipped package data (the checkout's configs/ links to it)


# --------------------------------------------------------------------------- fixtures in fairchem's format


def _fairchem_predictions(n, rng, dtype, energy_offset=0.0, with_forces=True, sid_fid=True):
    """Per-system lists gathered and concatenated as fairchem's ``save_results`` does."""
    ids = [f"{rng.integers(10**6)}_{i}" if sid_fid else f"{rng.integers(10**6)}{i}" for i in range(n)]
    energies = [np.asarray(rng.normal(energy_offset, 1.5), dtype=dtype) for _ in range(n)]
    forces = [rng.normal(0, 0.3, size=(int(rng.integers(1, 9)), 3)).astype(dtype) for _ in range(n)]
    _, idx = np.unique(ids, return_index=True)
    out = {"ids": np.array([ids[i] for i in idx]), "energy": np.array([energies[i] for i in idx])}
    if with_forces:
        out["forces"] = np.concatenate([forces[i] for i in idx])
        out["chunk_idx"] = np.cumsum([len(forces[i]) for i in idx])[:-1]
    return out


def _write_s2ef(
    folder: Path, dataset="oc20", dtype=np.float16, n=6, seed=0, energy_offset=0.0, name="s2ef_predictions.npz"
):
    rng = np.random.default_rng(seed)
    files = {}
    for split in SPLITS[dataset]:
        (folder / split).mkdir(parents=True, exist_ok=True)
        path = folder / split / name
        np.savez_compressed(path, **_fairchem_predictions(n, rng, dtype, energy_offset))
        files[split] = path
    return files


def _rewrite(path: Path, **changes):
    """Loads a per-split file, replaces/removes keys (value None removes) and saves it back."""
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez_compressed(path, **arrays)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture()
def quiet():
    """OC20 count checks warn for these tiny splits; tests that do not check warnings ignore them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SubmissionWarning)
        yield


# --------------------------------------------------------------------------- valid submissions


def test_oc20_s2ef_merges_every_split_and_key(tmp_path):
    files = _write_s2ef(tmp_path / "preds")
    with pytest.warns(SubmissionWarning) as caught:  # tiny splits != test-split sizes
        out = build_submission("s2ef", "oc20", files, tmp_path / "submission")
    counts = sorted(str(w.message).split("'")[1] for w in caught if "test split has" in str(w.message))
    assert counts == sorted(SPLITS["oc20"])  # one count warning per split, naming it

    assert out == tmp_path / "submission.npz" and out.is_file()
    merged = _load(out)  # as the server loads it
    assert set(merged) == {f"{s}_{k}" for s in SPLITS["oc20"] for k in TASK_KEYS["s2ef"]}
    for split, path in files.items():
        source = _load(path)
        for key, value in source.items():
            np.testing.assert_array_equal(merged[f"{split}_{key}"], value)
            assert merged[f"{split}_{key}"].dtype == value.dtype
        assert merged[f"{split}_energy"].shape == (6,)
        assert merged[f"{split}_energy"].dtype == np.float16
        assert merged[f"{split}_forces"].shape[1] == 3
        blocks = np.split(merged[f"{split}_forces"], merged[f"{split}_chunk_idx"])
        assert len(blocks) == 6 and all(len(b) >= 1 for b in blocks)


def test_sidecar_records_hashes_versions_and_config(tmp_path, quiet):
    files = _write_s2ef(tmp_path / "preds")
    checkpoint = tmp_path / "best_checkpoint.pt"
    checkpoint.write_bytes(b"not really a checkpoint")
    config = {"dataset": {"train": {"format": "lmdb"}}, "optim": {"use_denoising_pos": True}}

    out = build_submission("s2ef", "oc20", files, tmp_path / "sub.npz", checkpoint=checkpoint, config=config)

    sidecar = tmp_path / "sub.npz.json"
    record = json.loads(sidecar.read_text())
    assert record["task"] == "s2ef" and record["dataset"] == "oc20"
    for split, path in files.items():
        assert record["splits"][split]["count"] == 6
        assert record["splits"][split]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert Path(record["checkpoint"]["path"]) == checkpoint.resolve()
    assert record["config"] == config
    assert record["versions"]["fairchem-core"] == metadata.version("fairchem-core")
    assert record["versions"]["fairchem-dens"] == fairchem_dens.__version__
    assert record["versions"]["numpy"] == np.__version__
    assert record["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    created = dt.datetime.fromisoformat(record["created_utc"])
    assert created.utcoffset() == dt.timedelta(0)
    assert not any("json" in key or "meta" in key for key in _load(out))  # sidecar stays outside


def test_oc22_float32_accepted_and_float16_rejected(tmp_path):
    good = _write_s2ef(tmp_path / "f32", dataset="oc22", dtype=np.float32, energy_offset=-300.0)
    out = build_submission("s2ef", "oc22", good, tmp_path / "oc22.npz")
    merged = _load(out)
    assert set(merged) == {f"{s}_{k}" for s in ("id", "ood") for k in TASK_KEYS["s2ef"]}
    assert all(merged[f"{s}_{k}"].dtype == np.float32 for s in ("id", "ood") for k in ("energy", "forces"))

    bad = _write_s2ef(tmp_path / "f16", dataset="oc22", dtype=np.float16)
    with pytest.raises(SubmissionError, match="prediction_dtype: float32") as error:
        build_submission("s2ef", "oc22", bad, tmp_path / "oc22_f16.npz")
    assert "split 'id'" in str(error.value) and str(bad["id"]) in str(error.value)
    assert not (tmp_path / "oc22_f16.npz").exists()


def test_oc22_float64_is_cast_to_float32_with_a_warning(tmp_path):
    files = _write_s2ef(tmp_path / "f64", dataset="oc22", dtype=np.float64)
    with pytest.warns(SubmissionWarning, match="float32"):
        out = build_submission("s2ef", "oc22", files, tmp_path / "oc22.npz")
    merged = _load(out)
    assert merged["ood_forces"].dtype == np.float32
    np.testing.assert_allclose(merged["ood_energy"], _load(files["ood"])["energy"], rtol=F32_STORAGE_REL, atol=0)


def test_is2re_energy_of_shape_n_by_1_is_flattened(tmp_path, quiet):
    rng = np.random.default_rng(1)
    files = {}
    for split in SPLITS["oc20"]:
        arrays = _fairchem_predictions(5, rng, np.float16, with_forces=False, sid_fid=False)
        files[split] = tmp_path / f"{split}_is2re_predictions.npz"
        np.savez_compressed(files[split], ids=arrays["ids"], energy=arrays["energy"][:, None])
    merged = _load(build_submission("is2re", "oc20", files, tmp_path / "is2re.npz"))
    assert merged["ood_both_energy"].shape == (5,)
    assert set(merged) == {f"{s}_{k}" for s in SPLITS["oc20"] for k in ("ids", "energy")}


def test_is2rs_relaxed_positions(tmp_path, quiet):
    rng = np.random.default_rng(2)
    files = {}
    for split in SPLITS["oc20"]:
        natoms = rng.integers(20, 40, size=4)
        ids = np.array(sorted(str(s) for s in rng.choice(10**6, size=4, replace=False)))
        pos = [rng.uniform(0, 10, size=(n, 3)).astype(np.float32) for n in natoms]
        files[split] = tmp_path / split / "relaxed_positions.npz"
        files[split].parent.mkdir()
        np.savez_compressed(files[split], ids=ids, pos=np.concatenate(pos), chunk_idx=np.cumsum(natoms)[:-1])
    merged = _load(build_submission("is2rs", "oc20", files, tmp_path / "is2rs.npz"))
    assert set(merged) == {f"{s}_{k}" for s in SPLITS["oc20"] for k in ("ids", "pos", "chunk_idx")}
    assert len(np.split(merged["id_pos"], merged["id_chunk_idx"])) == 4


def test_is2re_from_relaxation_trajectories(tmp_path, quiet):
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT
    from ase.io import Trajectory

    folders, last_energies = {}, {}
    for k, split in enumerate(SPLITS["oc20"]):
        folders[split] = tmp_path / split
        folders[split].mkdir()
        for s in range(2):
            slab = fcc111("Cu", size=(2, 2, 2), vacuum=6.0)
            add_adsorbate(slab, "O", 1.5 + 0.1 * s, "fcc")
            sid = f"{1000 * k + s}"
            with Trajectory(folders[split] / f"{sid}.traj", "w") as traj:
                for frame in range(3):
                    slab.positions[-1, 2] -= 0.05 * frame
                    slab.calc = EMT()
                    last_energies[(split, sid)] = slab.get_potential_energy()
                    traj.write(slab)
    (folders["id"] / "notes.txt").write_text("ignored: not a trajectory")

    out = build_submission("is2re-relaxations", "oc20", folders, tmp_path / "is2re.npz")
    merged = _load(out)
    assert set(merged) == {f"{s}_{k}" for s in SPLITS["oc20"] for k in ("ids", "energy")}
    for split in SPLITS["oc20"]:
        for sid, energy in zip(merged[f"{split}_ids"], merged[f"{split}_energy"]):
            assert energy == pytest.approx(last_energies[(split, str(sid))], rel=F32_STORAGE_REL)
        assert merged[f"{split}_ids"].dtype.kind == "U"
    # the folder hash covers the trajectories, so the sidecar pins them
    record = json.loads((tmp_path / "is2re.npz.json").read_text())
    assert len(record["splits"]["id"]["sha256"]) == 64 and record["splits"]["id"]["count"] == 2


# --------------------------------------------------------------------------- rejections


def _object_ids(path):
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["ids"] = np.array(list(arrays["ids"]), dtype=object)
    np.savez(path, **arrays)  # np.savez pickles object arrays; the server will not unpickle


def _duplicate_ids(path):
    ids = _load(path)["ids"].copy()
    ids[1] = ids[0]
    _rewrite(path, ids=ids)


def _energy_n_by_2(path):
    energy = _load(path)["energy"]
    _rewrite(path, energy=np.stack([energy, energy], axis=1))


def _chunk_idx_beyond_forces(path):
    arrays = _load(path)
    chunk_idx = arrays["chunk_idx"].copy()
    chunk_idx[-1] = len(arrays["forces"]) + 3
    _rewrite(path, chunk_idx=chunk_idx)


def _chunk_idx_too_short(path):
    _rewrite(path, chunk_idx=_load(path)["chunk_idx"][:-1])


def _nan_energy(path):
    energy = _load(path)["energy"].copy()
    energy[2] = np.nan
    _rewrite(path, energy=energy)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: _rewrite(p, forces=None), r"missing key\(s\) \['forces'\]"),
        (_object_ids, "pickling"),
        (_duplicate_ids, "duplicated id"),
        (_energy_n_by_2, r"expected shape \(6,\)"),
        (_chunk_idx_beyond_forces, "exceeds"),
        (_chunk_idx_too_short, "len\\(ids\\) - 1"),
        (_nan_energy, "non-finite"),
    ],
    ids=["missing-key", "object-array", "duplicate-ids", "energy-2d", "chunk-beyond", "chunk-length", "nan-energy"],
)
def test_invalid_split_file_is_rejected_naming_split_and_file(tmp_path, quiet, corrupt, message):
    files = _write_s2ef(tmp_path / "preds")
    corrupt(files["ood_cat"])
    with pytest.raises(SubmissionError, match=message) as error:
        build_submission("s2ef", "oc20", files, tmp_path / "sub.npz")
    assert "split 'ood_cat'" in str(error.value)
    assert str(files["ood_cat"]) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds"]  # nothing written


def test_missing_and_unknown_splits_are_rejected(tmp_path, quiet):
    files = _write_s2ef(tmp_path / "preds")
    partial = {k: v for k, v in files.items() if k != "ood_both"}
    with pytest.raises(SubmissionError, match="missing split.*ood_both"):
        build_submission("s2ef", "oc20", partial, tmp_path / "sub.npz")
    with pytest.raises(SubmissionError, match="unknown split.*'ood'"):
        build_submission("s2ef", "oc20", {**files, "ood": files["id"]}, tmp_path / "sub.npz")
    assert not (tmp_path / "sub.npz").exists()


def test_strict_counts_turns_the_count_warning_into_an_error(tmp_path):
    files = _write_s2ef(tmp_path / "preds")
    with pytest.raises(SubmissionError, match="split 'id'.*999736"):
        build_submission("s2ef", "oc20", files, tmp_path / "sub.npz", strict_counts=True)


# --------------------------------------------------------------------------- total energies on OC20


def test_oc20_refuses_a_total_energy_config_unless_allowed(tmp_path, quiet):
    files = _write_s2ef(tmp_path / "preds")
    config = {
        "dataset": {"train": {"format": "lmdb", "transforms": {"element_references": {"energy": {"file": "x.npz"}}}}}
    }
    with pytest.raises(SubmissionError, match="element_references"):
        build_submission("s2ef", "oc20", files, tmp_path / "sub.npz", config=config)
    assert not (tmp_path / "sub.npz").exists()

    out = build_submission("s2ef", "oc20", files, tmp_path / "sub.npz", config=config, allow_total_energy=True)
    record = json.loads((tmp_path / "sub.npz.json").read_text())
    assert out.is_file() and record["allow_total_energy"] is True
    assert "element_references" in record["total_energy_reason"]


def test_shipped_oc22_config_with_includes_counts_as_total_energy(tmp_path, quiet):
    # The shipped OC22 recipe pulls its dataset section in via fairchem `includes:`.
    config = next((CONFIGS / "oc22" / "equiformer_v2").glob("*.yml"))
    files = _write_s2ef(tmp_path / "preds")
    with pytest.raises(SubmissionError, match="oc22_lmdb"):
        build_submission("s2ef", "oc20", files, tmp_path / "sub.npz", config=config)
    oc20_config = next((CONFIGS / "oc20" / "2M" / "equiformer_v2").glob("*.yml"))
    assert detect_total_energy({"dataset": {"train": {"format": "lmdb"}}}) is None
    assert build_submission("s2ef", "oc20", files, tmp_path / "ok.npz", config=oc20_config).is_file()


def test_detect_total_energy_flags():
    assert detect_total_energy({"task": {"dataset": "oc22_lmdb"}})
    assert detect_total_energy({"dataset": {"train": {"train_on_oc20_total_energies": True}}})
    assert detect_total_energy({"model": {"total_energy": True}})
    assert detect_total_energy({"model": {"total_energy": False}}) is None


def test_large_oc20_energies_warn_as_total_energies(tmp_path):
    files = _write_s2ef(tmp_path / "preds", energy_offset=-350.0, dtype=np.float32)
    warnings.filterwarnings("ignore", message=".*test split has", category=SubmissionWarning)
    with pytest.warns(SubmissionWarning, match="look like total energies"):
        build_submission("s2ef", "oc20", files, tmp_path / "sub.npz")


# --------------------------------------------------------------------------- writing


def test_existing_output_is_kept_without_overwrite_and_failures_leave_no_files(tmp_path, quiet):
    files = _write_s2ef(tmp_path / "preds")
    out = build_submission("s2ef", "oc20", files, tmp_path / "sub.npz")
    before = out.read_bytes(), (tmp_path / "sub.npz.json").read_bytes()

    with pytest.raises(SubmissionError, match="exists"):
        build_submission("s2ef", "oc20", files, out)
    assert (out.read_bytes(), (tmp_path / "sub.npz.json").read_bytes()) == before

    _nan_energy(files["id"])  # a failing rebuild must not touch the old submission
    with pytest.raises(SubmissionError, match="split 'id'"):
        build_submission("s2ef", "oc20", files, out, overwrite=True)
    assert out.read_bytes() == before[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds", "sub.npz", "sub.npz.json"]

    fresh = _write_s2ef(tmp_path / "preds2", seed=5)
    build_submission("s2ef", "oc20", fresh, out, overwrite=True)
    np.testing.assert_array_equal(_load(out)["id_ids"], _load(fresh["id"])["ids"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds", "preds2", "sub.npz", "sub.npz.json"]


@pytest.mark.parametrize(("umask", "mode"), [("022", 0o644), ("077", 0o600)])
def test_submission_files_get_the_mode_of_the_users_umask(tmp_path, umask, mode):
    import shlex
    import subprocess
    import sys

    files = _write_s2ef(tmp_path / "preds")
    out = tmp_path / "submission.npz"
    command = [
        sys.executable,
        "-m",
        "fairchem_dens.cli",
        "make-submission",
        "s2ef",
        "--out",
        str(out),
        *(arg for split, path in files.items() for arg in (f"--{split.replace('_', '-')}", str(path))),
    ]
    result = subprocess.run(
        ["bash", "-c", f"umask {umask} && exec {shlex.join(command)}"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert {path.name: path.stat().st_mode & 0o777 for path in (out, tmp_path / "submission.npz.json")} == {
        "submission.npz": mode,
        "submission.npz.json": mode,
    }
