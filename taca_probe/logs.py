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
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, verbosity, bar in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bar else lib.disable_progress_bar)()
