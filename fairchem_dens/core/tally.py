"""How much of an epoch DeNS corrupted: counted per batch, reported once per epoch.

A DeNS run whose settings corrupt nothing (a filter that excludes everything, MD-only
data with ``relaxation_only``) would train a plain model without a word; the epoch line
says what happened and warns when nothing was corrupted.
"""

from __future__ import annotations

from typing import Any

import torch

from fairchem_dens.core.batch import corrupted_atoms, corrupted_structures
from fairchem_dens.core.loss import LOCAL, Reduction

__all__ = ["CorruptionTally"]


class CorruptionTally:
    """Corrupted and seen structures and atoms of the training batches of one epoch."""

    def __init__(self) -> None:
        # summed where the masks live, so a step adds no host-device sync
        self._corrupted = torch.zeros(2, dtype=torch.long)
        self._seen = [0, 0]

    def add(self, data: Any) -> None:
        """Counts a training batch (corrupted or not)."""
        corrupted = torch.stack([corrupted_structures(data).sum(), corrupted_atoms(data).sum()])
        self._corrupted = self._corrupted.to(corrupted.device) + corrupted
        self._seen = [self._seen[0] + data.natoms.numel(), self._seen[1] + data.pos.shape[0]]

    def report(self, epoch: int, ranks: Reduction = LOCAL) -> tuple[str, bool]:
        """The epoch's line over every rank (call on all ranks together), and whether it is a warning.

        Resets the counts for the next epoch. ``epoch`` is 0-based.
        """
        counts = torch.cat([self._corrupted.cpu(), torch.tensor(self._seen)])
        structures, atoms, total_structures, total_atoms = (int(n) for n in ranks.sum_over_ranks(counts).tolist())
        self.__init__()
        line = (
            f"DeNS epoch {epoch + 1}: corrupted {structures}/{total_structures} structures "
            f"({100 * structures / max(total_structures, 1):.1f}%), {atoms}/{total_atoms} atoms "
            f"({100 * atoms / max(total_atoms, 1):.1f}%)"
        )
        if structures == 0:
            return (
                f"{line}: DeNS is on but corrupted nothing this epoch; check optim.denoising_pos_params "
                "(prob, corrupt_ratio, relaxation_only, the skip filters) against the training set."
            ), True
        return line, False
