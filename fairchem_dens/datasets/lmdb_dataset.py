"""fairchem's LMDB dataset plus a per-entry ``md`` flag and errors that name the file.

The All+MD DeNS recipe denoises relaxation frames only: entries from *ab initio*
MD (``md = 1``) are never corrupted. The flag comes from, in order:

1. an ``md`` field stored in the LMDB entries themselves;
2. the ``data_log.*.txt`` files that OC20's S2EF preprocessing writes beside the
   LMDBs, one line per entry whose first field is the source trajectory path:
   a path containing ``relaxations`` is a relaxation frame, else a path
   containing ``md`` is an MD frame, else a relaxation frame (the rule of the
   original implementation, applied to the path field only).

For a folder the logs are paired with the LMDBs in sorted order and every pair
must have as many lines as entries; for a single ``data.0003.lmdb`` the log is
``data_log.0003.txt`` (or ``data.0003.txt``) beside it. With neither source the
dataset still works, but a config that asks for relaxation-only denoising stops
before training.
"""

from __future__ import annotations

import bisect
import pickle
import re
from pathlib import Path

import lmdb
import numpy as np

from fairchem_dens.versions import require_fairchem

require_fairchem("fairchem1", "fairchem_dens.datasets (the fairchem-1.10 integration)")

from fairchem.core.common.registry import registry  # noqa: E402 (after the version gate)
from fairchem.core.datasets.lmdb_dataset import LmdbDataset  # noqa: E402 (after the version gate)

from fairchem_dens.errors import FairchemDensError  # noqa: E402 (after the version gate)

__all__ = [
    "DeNSLmdbDataset",
    "LmdbDataError",
    "MDFlagError",
    "md_flags_from_log",
    "is_md_line",
]


class LmdbDataError(FairchemDensError, ValueError):
    """An LMDB file or entry cannot be read."""


class MDFlagError(LmdbDataError):
    """The MD flags cannot be matched to the entries."""


def is_md_line(line: str) -> bool:
    """Whether a ``data_log`` line describes an MD frame."""
    path = line.split(",", 1)[0].lower()
    if "relaxations" in path:
        return False
    return "md" in path


def md_flags_from_log(path: Path) -> np.ndarray:
    """0/1 flags, one per non-empty line of a ``data_log`` file."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    return np.array([is_md_line(line) for line in lines], dtype=np.int8)


def _log_for(lmdb_path: Path) -> Path | None:
    """The preprocessing log of one LMDB file (``data.0003.lmdb`` -> ``data_log.0003.txt``)."""
    match = re.search(r"(\d+)$", lmdb_path.stem)
    candidates = [lmdb_path.with_suffix(".txt")]
    if match:
        candidates.insert(0, lmdb_path.parent / f"data_log.{match.group(1)}.txt")
    return next((c for c in candidates if c.is_file()), None)


@registry.register_dataset("fairchem_dens_lmdb")
class DeNSLmdbDataset(LmdbDataset):
    """fairchem's ``lmdb`` dataset whose entries carry ``md`` (0 relaxation, 1 MD).

    Config keys are those of fairchem's ``lmdb`` format. A truncated or corrupt
    file, or an unreadable entry, raises :class:`LmdbDataError` naming the file
    and the entry instead of a bare ``lmdb``/``pickle`` error.

    Attributes:
        md_source: ``entries``, ``logs`` or ``None`` (no MD information).
    """

    def __init__(self, config: dict) -> None:
        try:
            super().__init__(config)
        except lmdb.Error as error:
            raise LmdbDataError(
                f"cannot open the LMDB data at {config.get('src')}: {error} (truncated or corrupt file?)"
            ) from error
        self._md_flags: np.ndarray | None = None
        self.md_source: str | None = None
        if self.num_samples == 0:
            return
        if self._first_entry_has_md():
            self.md_source = "entries"
        else:
            self._md_flags = self._flags_from_logs()
            self.md_source = None if self._md_flags is None else "logs"

    def _first_entry_has_md(self) -> bool:
        env = self.envs[0] if not self.path.is_file() else self.env
        keys = self._keys[0] if not self.path.is_file() else self._keys
        raw = env.begin().get(f"{keys[0]}".encode("ascii"))
        if raw is None:
            raise MDFlagError(f"{self.path}: entry 0 is missing (truncated LMDB?)")
        return getattr(pickle.loads(raw), "md", None) is not None

    def _flags_from_logs(self) -> np.ndarray | None:
        lmdbs = [self.path] if self.path.is_file() else sorted(self.path.glob("*.lmdb"))
        counts = [len(keys) for keys in self._keys] if not self.path.is_file() else [len(self._keys)]
        logs = [_log_for(path) for path in lmdbs]
        if all(log is None for log in logs):
            return None
        flags = []
        for lmdb_path, log, count in zip(lmdbs, logs, counts):
            if log is None:
                raise MDFlagError(f"{lmdb_path} has no data_log file beside it, but other LMDBs of {self.path} do")
            file_flags = md_flags_from_log(log)
            if len(file_flags) != count:
                raise MDFlagError(
                    f"{log} has {len(file_flags)} lines but {lmdb_path} has {count} entries: "
                    "the log must describe the LMDB line by line"
                )
            flags.append(file_flags)
        return np.concatenate(flags)

    def _locate(self, idx: int) -> tuple[Path, int]:
        """The file and the entry number within it of dataset index ``idx``."""
        index = self.indices[idx]
        if self.path.is_file():
            return self.path, index
        db = bisect.bisect(self._keylen_cumulative, index)
        start = self._keylen_cumulative[db - 1] if db else 0
        return sorted(self.path.glob("*.lmdb"))[db], index - start

    def __getitem__(self, idx: int):
        try:
            data = super().__getitem__(idx)
        except (TypeError, EOFError, pickle.UnpicklingError, lmdb.Error) as error:
            path, entry = self._locate(idx)
            raise LmdbDataError(
                f"{path}: entry {entry} cannot be read ({type(error).__name__}: {error}); "
                "the file may be truncated or corrupt"
            ) from error
        if self._md_flags is not None:
            # fairchem remaps idx through self.indices (shards, subsets): use the global index.
            data.md = int(self._md_flags[self.indices[idx]])
        return data
