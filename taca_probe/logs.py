"""Quiet library chatter: what diffusers and transformers print while embedded models build and load."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import diffusers.utils.logging as dlog
import transformers.utils.logging as tlog

__all__ = ["quiet"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence diffusers/transformers info, warnings and progress bars, restoring them after.

    Used around building and loading the embedded models, whose loading chatter ("Loading pipeline
    components...", torchvision fallbacks of unused image processors) says nothing useful.
    """
    saved = (
        dlog.get_verbosity(),
        dlog.is_progress_bar_enabled(),
        tlog.get_verbosity(),
        tlog.is_progress_bar_enabled(),
    )
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(saved[0])
        (dlog.enable_progress_bar if saved[1] else dlog.disable_progress_bar)()
        tlog.set_verbosity(saved[2])
        (tlog.enable_progress_bar if saved[3] else tlog.disable_progress_bar)()
