"""Unreadable checkpoints get the right diagnosis: damaged, not a checkpoint, or needs pickle.

Every case goes through the real command lines (`fairchem --mode train --checkpoint`,
`fairchem-dens convert-checkpoint`), which share `read_checkpoint`.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from fairchem_dens.models.checkpoints import CheckpointReadError, read_checkpoint
from fairchem_dens.quickstart import fairchem_command

from helpers import DATA, QUICKSTART, data_overrides

ORIGINAL_CHECKPOINT = DATA / "original_dens" / "eqv2_dens" / "checkpoint.pt"


def truncated_copy(path, folder):
    """The first half of ``path``, as `head -c $((size/2))` writes it."""
    data = path.read_bytes()
    target = folder / "trunc.pt"
    target.write_bytes(data[: len(data) // 2])
    return target


def convert(source, target, *flags):
    return subprocess.run(
        [sys.executable, "-m", "fairchem_dens.cli", "convert-checkpoint", str(source), str(target), *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_truncated_checkpoint_is_called_damaged_by_fairchem_train(emt_data, tmp_path):
    trunc = truncated_copy(ORIGINAL_CHECKPOINT, tmp_path)
    result = subprocess.run(
        [
            *fairchem_command(),
            "--mode",
            "train",
            "--config-yml",
            str(QUICKSTART / "eqv2_dens_tiny.yml"),
            "--cpu",
            "--run-dir",
            str(tmp_path),
            "--timestamp-id",
            "trunc",
            *data_overrides(emt_data),
            "--checkpoint",
            str(trunc),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"damaged (truncated?) checkpoint file {trunc} ({trunc.stat().st_size} bytes)" in out, out[-3000:]
    assert "failed finding central directory" in out and "use an intact copy" in out
    assert "if you trust the file" not in out  # the --allow-pickle advice would not help


def test_convert_checkpoint_explains_damaged_and_foreign_files(tmp_path):
    trunc = truncated_copy(ORIGINAL_CHECKPOINT, tmp_path)
    size = trunc.stat().st_size
    for flags in ((), ("--allow-pickle",)):  # the advice of the old message, followed
        result = convert(trunc, tmp_path / "out.pt", *flags)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == [
            f"convert-checkpoint: damaged (truncated?) checkpoint file {trunc} ({size} bytes): its zip archive "
            "cannot be opened (File is not a zip file; torch: PytorchStreamReader failed reading zip archive: "
            "failed finding central directory); no torch.load option (nor --allow-pickle) can read it: "
            "use an intact copy"
        ]
    text = tmp_path / "notes.pt"
    text.write_text("epoch 12, lr 2e-4\n")
    result = convert(text, tmp_path / "out.pt")
    assert result.stderr.strip() == (
        f"convert-checkpoint: {text} (18 bytes) is not a PyTorch checkpoint: it starts with b'epoc', neither a "
        "zip archive (torch.save) nor a pickle stream (torch.save before 1.6)"
    )
    assert not (tmp_path / "out.pt").exists()


def test_empty_files_and_truncated_legacy_files_are_damaged_other_zips_no_checkpoints(tmp_path):
    import zipfile

    other = tmp_path / "results.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("results/table.csv", "epoch,mae\n1,0.5\n")
    no_checkpoint = r"results.zip \(\d+ bytes\) is not a PyTorch checkpoint: a zip archive without the data.pkl"
    with pytest.raises(CheckpointReadError, match=no_checkpoint):
        read_checkpoint(other, allow_pickle=True)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    damaged = r"damaged \(truncated\?\) checkpoint file .*empty.pt \(0 bytes\): it is empty"
    with pytest.raises(CheckpointReadError, match=damaged):
        read_checkpoint(empty, allow_pickle=True)
    legacy = tmp_path / "legacy.pt"  # torch < 1.6's format: a bare pickle stream, then the storages
    torch.save({"state_dict": {"w": torch.ones(64)}}, legacy, _use_new_zipfile_serialization=False)
    whole = legacy.read_bytes()
    # cut inside the storages (torch raises UnpicklingError) and inside the pickle (EOFError)
    for part in (whole[:-40], whole[:200]):
        legacy.write_bytes(part)
        with pytest.raises(CheckpointReadError, match="legacy.pt .* it ends before its pickle stream does"):
            read_checkpoint(legacy, allow_pickle=True)


def test_a_sound_file_that_needs_pickle_is_still_told_so_and_converts_with_allow_pickle(tmp_path):
    checkpoint = torch.load(ORIGINAL_CHECKPOINT, map_location="cpu", weights_only=True)
    checkpoint["note"] = Fraction(1, 3)  # a class weights_only refuses
    needs_pickle = tmp_path / "needs_pickle.pt"
    torch.save(checkpoint, needs_pickle)
    refused = convert(needs_pickle, tmp_path / "out.pt")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f"convert-checkpoint: {needs_pickle} needs full unpickling" in refused.stderr
    assert "GLOBAL fractions.Fraction was not an allowed global" in refused.stderr
    assert "convert it with `fairchem-dens convert-checkpoint --allow-pickle IN OUT`" in refused.stderr
    converted = convert(needs_pickle, tmp_path / "out.pt", "--allow-pickle")
    assert converted.returncode == 0, converted.stderr
    assert torch.load(tmp_path / "out.pt", weights_only=False)["note"] == Fraction(1, 3)
