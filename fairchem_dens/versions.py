"""Which fairchem-core an integration was built for, read from the package's own requirements.

``pyproject.toml`` is the one place the pins live: fairchem 1.10 for the integration in
``models/``, ``trainers/`` and ``datasets/``, fairchem 2.x for ``fairchem2/``. Each
integration checks the installed fairchem-core when it is imported; the DeNS core
(:mod:`fairchem_dens.core`) needs neither.
"""

from __future__ import annotations

import re
from importlib import metadata

from fairchem_dens.errors import FairchemDensError

__all__ = ["FairchemVersionError", "pinned_fairchem", "require_fairchem"]


class FairchemVersionError(FairchemDensError, ImportError):
    """The installed fairchem-core is not the one an integration was built for."""


def pinned_fairchem(extra: str) -> str:
    """The fairchem-core version pinned for an integration (``fairchem1`` or ``fairchem2``)."""
    for requirement in metadata.requires("fairchem-dens") or []:
        match = re.match(r"fairchem-core\s*==\s*([\w.]+)\s*(?:;\s*(.*))?$", requirement)
        if match and (match.group(2) is None or f'extra == "{extra}"' in match.group(2)):
            return match.group(1)
    raise FairchemVersionError(f"fairchem-dens's metadata pins no fairchem-core for `{extra}`: reinstall fairchem-dens")


def require_fairchem(extra: str, what: str) -> None:
    """Refuses to import an integration on another fairchem-core than its pin.

    Args:
        extra: the integration's extra in pyproject.toml (``fairchem1``, ``fairchem2``).
        what: the integration in words, for the message.
    """
    required = pinned_fairchem(extra)
    try:
        installed = metadata.version("fairchem-core")
    except metadata.PackageNotFoundError as error:
        raise FairchemVersionError(
            f"{what} needs fairchem-core=={required}, which is not installed: pip install 'fairchem-dens[{extra}]'"
        ) from error
    if installed != required:
        raise FairchemVersionError(
            f"{what} needs fairchem-core=={required}; found fairchem-core=={installed}. "
            f"Install the pinned version: pip install 'fairchem-dens[{extra}]'"
        )
