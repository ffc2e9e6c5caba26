"""The one atomic writer: a complete file or folder appears by one rename, or nothing changes."""

import os
import stat

import pytest

from fairchem_dens.files import atomic_write, publish, replace_dir, sha256_file, staging_dir


def test_atomic_write_renames_the_finished_file(tmp_path):
    target = tmp_path / "out" / "data.bin"
    with atomic_write(target) as temp:
        assert temp.parent == target.parent and temp.exists() and not target.exists()
        temp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [path.name for path in target.parent.iterdir()] == ["data.bin"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target) as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["data.bin"]


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_get_the_umask_mode(tmp_path, umask, file_mode, folder_mode):
    previous = os.umask(umask)
    try:
        with atomic_write(tmp_path / "file") as temp:
            temp.write_text("x")
        folder = staging_dir(tmp_path / "folder")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == file_mode
    assert stat.S_IMODE(folder.stat().st_mode) == folder_mode


def test_replace_dir_swaps_a_full_folder(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    staging = staging_dir(out_dir)
    (staging / "new.txt").write_text("new")
    replace_dir(staging, out_dir)
    assert [path.name for path in out_dir.iterdir()] == ["new.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # neither staging nor the old folder is left


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)
    assert sha256_file(path, chunk=4096) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_moves_each_entry_and_retires_stale_ones(tmp_path):
    out_dir, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    for name in ("train", "stale"):
        (out_dir / name).mkdir(parents=True)
        (out_dir / name / "old").write_text("old")
    (staging / "train").mkdir(parents=True)
    (staging / "train" / "new").write_text("new")
    (staging / "dataset.json").write_text("{}")
    publish(staging, out_dir, ["train", "dataset.json"], retire=["stale"])
    assert sorted(path.name for path in out_dir.iterdir()) == [".staging", "dataset.json", "train"]
    assert [path.name for path in (out_dir / "train").iterdir()] == ["new"]
    assert sorted(path.name for path in (staging / ".replaced").iterdir()) == ["stale", "train"]
