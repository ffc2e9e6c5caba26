"""Files this package writes: atomic replacement and the checksums recorded beside them.

Every output appears by one rename of a complete temporary file (or folder) built
beside it, so a job killed mid-write leaves the previous output, never half a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "publish", "replace_dir", "replace_durably", "sha256_file", "staging_dir", "temp_beside"]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB checkpoints need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_beside(path: Path) -> Path:
    """An empty hidden temp file in ``path``'s folder, so ``os.replace`` is an atomic rename.

    Created by ``open(..., "x")``, not ``mkstemp``: the renamed file keeps the mode the
    user's umask gives any new file, where mkstemp's would stay 0600.
    """
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temp.open("x").close()
    return temp


def replace_durably(temp: str | Path, target: str | Path) -> None:
    """Flushes ``temp`` to disk, then renames it over ``target`` (a crash leaves one or the other)."""
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, target)


@contextmanager
def atomic_write(target: str | Path) -> Iterator[Path]:
    """Yields an empty temp path beside ``target`` to write; a clean exit renames it to ``target``.

    On an error the temp file is removed and ``target`` is left as it was. Write
    through a handle (``open(temp, "wb")``) where a writer would add a suffix to a
    name (``np.savez``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(target)
    try:
        yield temp
        replace_durably(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def staging_dir(beside: Path) -> Path:
    """An empty hidden folder beside ``beside`` (same file system: the final rename is atomic).

    It gets the mode a ``mkdir`` would (mkdtemp makes it private), so a published folder looks made by hand.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-", dir=beside.parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Moves ``staging`` to ``out_dir``, replacing what is there only once the new data is complete."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(staging, out_dir)
        return
    # os.replace cannot replace a non-empty folder: move the old one aside, then drop it.
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(old, out_dir)  # put the previous output back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def publish(staging: Path, out_dir: Path, names: Iterable[str], retire: Iterable[str] = ()) -> None:
    """Moves the complete files and folders ``names`` from ``staging`` into ``out_dir``.

    Each appears by one rename, so a reader (or an interrupted run) never sees half of
    one; what they replace, and the entries ``retire`` of ``out_dir`` that have no
    successor, go to ``staging`` to be deleted with it.
    """
    replaced = staging / ".replaced"
    replaced.mkdir()
    for name in retire:
        os.replace(out_dir / name, replaced / name)
    for name in names:
        if (out_dir / name).exists():
            os.replace(out_dir / name, replaced / name)
        os.replace(staging / name, out_dir / name)
