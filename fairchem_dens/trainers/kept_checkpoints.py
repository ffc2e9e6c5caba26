"""``optim.keep_checkpoint_epochs``: copies of ``checkpoint.pt`` kept at chosen epochs.

fairchem writes ``checkpoint.pt`` every ``optim.checkpoint_every`` steps and overwrites it.
A learning curve read from one run (test errors after 5, 10, 20 ... epochs of the same
schedule) needs the weights of those epochs: the trainer keeps a copy,
``checkpoint_epoch_<N>.pt``, when it saves ``checkpoint.pt`` at the end of a listed epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fairchem_dens.core.errors import DeNSSetupError

__all__ = ["KEY", "kept_epochs", "kept_name"]

KEY = "keep_checkpoint_epochs"


def kept_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch}.pt"


def kept_epochs(optim: Mapping[str, Any], steps_per_epoch: int) -> frozenset[int]:
    """The listed epochs, refused unless ``checkpoint.pt`` is really saved at the end of each.

    fairchem saves it every ``checkpoint_every`` steps (with -1: at every validation,
    ``eval_every`` steps; by default ``eval_every`` steps) and the DeNS trainer once more when
    training ends, so the last epoch is always available.
    """
    listed = optim.get(KEY) or ()
    if isinstance(listed, int) or not all(isinstance(e, int) and not isinstance(e, bool) for e in listed):
        raise DeNSSetupError(f"optim.{KEY} must be a list of epoch numbers, got {listed!r}")
    max_epochs = optim["max_epochs"]
    eval_every = optim.get("eval_every", steps_per_epoch)
    every = optim.get("checkpoint_every", eval_every)
    every = eval_every if every == -1 else every
    for epoch in listed:
        if not 1 <= epoch <= max_epochs:
            raise DeNSSetupError(f"optim.{KEY}: epoch {epoch} is outside 1..{max_epochs} (optim.max_epochs)")
        if epoch != max_epochs and (epoch * steps_per_epoch) % every:
            raise DeNSSetupError(
                f"optim.{KEY}: epoch {epoch} ends at step {epoch * steps_per_epoch}, where no checkpoint is "
                f"saved (every {every} steps, optim.checkpoint_every or eval_every): set "
                f"optim.checkpoint_every={steps_per_epoch} ({steps_per_epoch} steps an epoch)"
            )
    return frozenset(listed)
