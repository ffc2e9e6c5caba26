"""The refusals of the DeNS core, shared by every integration."""

from __future__ import annotations

from fairchem_dens.errors import FairchemDensError

__all__ = ["DeNSConfigError", "DeNSSetupError", "NonFiniteLossError"]


class DeNSConfigError(FairchemDensError, ValueError):
    """A DeNS setting is missing, unknown or out of range."""


class DeNSSetupError(FairchemDensError, ValueError):
    """The config cannot train with DeNS; the message names the key and the fix."""


class NonFiniteLossError(FairchemDensError, FloatingPointError):
    """A prediction, target or loss term became NaN or infinite."""
