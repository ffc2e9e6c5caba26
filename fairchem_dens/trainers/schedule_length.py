"""``optim.schedule_epochs``: a run that follows the first epochs of a longer schedule.

fairchem sets the length of its cosine learning-rate schedule to ``optim.max_epochs``, and
the DeNS weight decays over the same length. With ``schedule_epochs`` both follow a schedule
of that many epochs while the run stops at ``max_epochs``: the first 100 epochs of MD17's
1500-epoch schedule train at the learning rate and denoising weight the paper's run had
then, where a 100-epoch schedule would have annealed both to their floor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fairchem_dens.core.errors import DeNSSetupError

__all__ = ["KEY", "schedule_epochs"]

KEY = "schedule_epochs"


def schedule_epochs(optim: Mapping[str, Any]) -> int:
    """The schedule's length in epochs: ``optim.schedule_epochs``, else ``optim.max_epochs``."""
    max_epochs = optim["max_epochs"]
    length = optim.get(KEY)
    if length is None:
        return max_epochs
    if isinstance(length, bool) or not isinstance(length, int) or length < max_epochs:
        raise DeNSSetupError(
            f"optim.{KEY} (the length of the learning-rate and denoising-weight schedules) must be a whole "
            f"number of epochs at least optim.max_epochs ({max_epochs}), got {length!r}"
        )
    return length
