"""The one base class of every refusal fairchem-dens raises.

Each message names the problem and its fix. Catch :class:`FairchemDensError` to catch
them all; each subclass also keeps the builtin base it always had (``ValueError`` for
bad settings and data, ``FloatingPointError`` for a non-finite loss, ``ImportError`` for
a wrong fairchem), so code written against those keeps working.
"""

from __future__ import annotations

__all__ = ["FairchemDensError"]


class FairchemDensError(Exception):
    """A refusal of fairchem-dens: bad settings, data, checkpoint, environment or a broken step."""
