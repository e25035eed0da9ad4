"""User-facing errors.

Every error that bad input can cause is a :class:`TacaProbeError`. The CLI prints its message on one
line and exits with status 2; the Python API lets it propagate so notebooks show it as usual.
"""

from __future__ import annotations

__all__ = ["first_line", "TacaProbeError", "ModelError", "ScheduleError", "StoreError"]


class TacaProbeError(Exception):
    """Base class of the errors that bad input causes; the message is one self-contained line."""


class ModelError(TacaProbeError):
    """A model that cannot be found, loaded, or is not a supported MM-DiT."""


class ScheduleError(TacaProbeError, ValueError):
    """A malformed or impossible gamma schedule (also a ``ValueError``)."""


class StoreError(TacaProbeError):
    """A store that is missing, not a taca-probe store, of an unknown schema, or inconsistent."""


def first_line(exc: BaseException) -> str:
    """``"KeyError: the first non-empty line"`` of an exception from a library, for a one-line message."""
    line = next((text.strip() for text in str(exc).splitlines() if text.strip()), "")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
