"""Training labels checked where they enter: the normaliser fit and every training batch.

A NaN or infinite label fails far from its cause: the normaliser fit comes out
NaN, or, with the normaliser values given, the force of a corrupted atom is
encoded into its node features and the run stops steps later on a NaN prediction.
Labels are therefore checked (1) while fairchem's normaliser fit reads the training
set, naming the file and the entry, and (2) in every training batch before it is
corrupted, naming the target, the structures' sids and the step.

The fit's pass also yields the per-structure quantities of the DeNS skip filters,
so a filter that excludes every training structure is refused without a pass of
its own (:func:`fairchem_dens.trainers.guards.check_skip_filters`).
"""

from __future__ import annotations

from array import array
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from fairchem_dens.core.corruption import skip_filter_values
from fairchem_dens.core.settings import DeNSConfig
from fairchem_dens.errors import FairchemDensError

__all__ = ["FitRecorder", "NonFiniteLabelError", "check_batch_labels", "non_finite_labels"]

#: Entries named in a message; the count of the others is given.
NAMED = 5


class NonFiniteLabelError(FairchemDensError, ValueError):
    """A training label is NaN or infinite; the message names the entries."""


def non_finite_labels(data: Any, names: Iterable[str]) -> list[str]:
    """The names among ``names`` whose label in ``data`` holds a NaN or an inf."""
    labels = {
        name: value
        for name in names
        if torch.is_tensor(value := getattr(data, name, None)) and value.is_floating_point()
    }
    if not labels:
        return []
    # one flag per label, read in one go: a single host-device sync per training step
    finite = torch.stack([torch.isfinite(value).all() for value in labels.values()]).tolist()
    return [name for name, ok in zip(labels, finite) if not ok]


def _sid(data: Any, index: int) -> str:
    sid = getattr(data, "sid", None)
    if sid is None:
        return "?"
    if torch.is_tensor(sid):
        sid = sid.view(-1).tolist()
    elif not isinstance(sid, (list, tuple)):
        sid = [sid]
    return str(sid[index])


def _entry(dataset: Dataset, index: int, source: str) -> str:
    """``<file> entry <n>``: the LMDB file within a folder where the dataset knows it."""
    from fairchem.core.datasets.lmdb_dataset import LmdbDataset

    from fairchem_dens.datasets.lmdb_dataset import DeNSLmdbDataset

    while hasattr(dataset, "dataset"):  # fairchem's (shuffled) Subset of the file's entries
        index, dataset = int(dataset.indices[index]), dataset.dataset
    if isinstance(dataset, LmdbDataset):  # the same file layout in fairchem's class and ours
        path, entry = DeNSLmdbDataset._locate(dataset, index)
        return f"{path} entry {entry}"
    return f"{source} entry {index}"


class FitRecorder(Dataset):
    """The training set as fairchem's normaliser fit reads it, noting what the checks need.

    Each entry read is checked for non-finite labels and its skip-filter quantities
    are kept (one small number per filter). A fit run in worker processes
    (``fit.num_workers > 0``) or on part of the set leaves :attr:`complete` false.

    Args:
        dataset: the training dataset.
        labels: the label names to check.
        dens: the DeNS settings (for the skip filters).
        source: the dataset's ``src``, for messages.
    """

    def __init__(self, dataset: Dataset, labels: Iterable[str], dens: DeNSConfig, source: str) -> None:
        self.dataset, self.labels, self.dens, self.source = dataset, tuple(labels), dens, source
        # compact for sets of millions of entries: a flag and one float per filter each
        self.seen = np.zeros(len(dataset), dtype=bool)
        self.bad: list[tuple[int, str, list[str]]] = []
        self.filter_values: dict[str, array] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        data = self.dataset[index]
        if self.seen[index]:  # the element-reference fit reads the set too
            return data
        self.seen[index] = True
        names = non_finite_labels(data, self.labels)
        if names:
            self.bad.append((int(index), _sid(data, 0), names))
        elif self.dens.enabled:
            natoms = int(data.natoms) if hasattr(data, "natoms") else data.pos.shape[0]
            values = skip_filter_values(
                self.dens,
                torch.zeros(natoms, dtype=torch.long),
                1,
                getattr(data, "forces", None),
                getattr(data, "stress", None),
            )
            for key, value in values.items():
                self.filter_values.setdefault(key, array("d")).append(float(value))
        return data

    @property
    def complete(self) -> bool:
        """Whether every entry of the set was read in this process."""
        return bool(self.seen.all())

    def non_finite_message(self) -> str | None:
        """The error for the entries with non-finite labels, or None."""
        if not self.bad:
            return None
        named = "; ".join(
            f"{_entry(self.dataset, index, self.source)} (sid {sid}): {', '.join(f'`{n}`' for n in names)}"
            for index, sid, names in sorted(self.bad)[:NAMED]
        )
        more = f" and {len(self.bad) - NAMED} more entries" if len(self.bad) > NAMED else ""
        return (
            f"the training set {self.source} has NaN/inf labels, found by the normalizer fit: {named}{more}. "
            "The fit would be NaN and DeNS would encode a NaN force into the node features: fix or drop those entries."
        )


def check_batch_labels(batch: Any, labels: Iterable[str], step: int, epoch: float) -> None:
    """Refuses a training batch with a NaN/inf label, before it is corrupted and its forces encoded.

    Args:
        batch: the collated training batch.
        labels: the label names to check.
        step: the global step, for the message.
        epoch: fairchem's fractional epoch, for the message.
    """
    num_atoms, num_structures = batch.pos.shape[0], batch.natoms.numel()
    for name in non_finite_labels(batch, labels):
        value = batch[name]
        if value.shape[0] == num_atoms:  # per-atom rows
            bad_rows = ~torch.isfinite(value.reshape(num_atoms, -1)).all(dim=1)
            structures = torch.unique(batch.batch[bad_rows.to(batch.batch.device)]).tolist()
        else:
            bad_rows = ~torch.isfinite(value.reshape(num_structures, -1)).all(dim=1)
            structures = bad_rows.nonzero().view(-1).tolist()
        sids = ", ".join(_sid(batch, s) for s in structures)
        raise NonFiniteLabelError(
            f"the `{name}` label has {int((~torch.isfinite(value)).sum())} NaN/inf value(s) in the training batch "
            f"at step {step} (epoch {epoch:.3f}), structure(s) with sid {sids}: fix or drop those entries of the "
            "training set; stopping before the batch is corrupted, its forces encoded or the weights updated."
        )
