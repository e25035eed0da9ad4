"""The ``taca-probe`` command line: thin commands over shared parent parsers.

Every error that bad input causes ends in one line on stderr and exit status 2; no traceback
(set ``TACA_PROBE_DEBUG=1`` to see one for an unexpected internal error).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from .. import __version__
from ..errors import TacaProbeError
from ..integrity import settle_pending_reads
from . import bench, figures, record
from .args import EMBEDDED_NOTE, _Parser
from .eval import add_parser as add_eval_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taca-probe",
        description="TACA (temperature-adjusted cross-modal attention) and attention probes for MM-DiT "
        "diffusion transformers (SD3, SD3.5, FLUX.1) in diffusers. " + EMBEDDED_NOTE,
    )
    parser.add_argument("--version", action="version", version=f"taca-probe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    record.add_parsers(sub)
    add_eval_parser(sub)  # taca-probe eval: the shapes model's exact compositional benchmark
    figures.add_parsers(sub)
    bench.add_parsers(sub, _Parser)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # a warning (a sweep store not recorded yet, samples left out) is news for the user, not a source location
    text = next((t.strip() for t in str(message).splitlines() if t.strip()), category.__name__)
    return f"taca-probe: warning: {text}\n"


def main(argv: Sequence[str] | None = None) -> int:
    # catch_warnings does not restore formatwarning: put it back by hand for callers of main (tests, notebooks)
    original = warnings.formatwarning
    if not os.environ.get("TACA_PROBE_DEBUG"):
        warnings.formatwarning = _one_line_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = original


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except TacaProbeError as e:
        # let zarr's reads still in flight finish, so that no "Task was destroyed but it is
        # pending!" or task traceback follows the one-line message
        settle_pending_reads()
        print(f"taca-probe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taca-probe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `taca-probe info STORE | head`
        return 0
    except OSError as e:  # disk full, read-only, a file where a folder should be: the user's to fix
        where = f": {e.filename!r}" if e.filename else ""
        print(f"taca-probe: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # an internal error: still one line, unless debugging
        if os.environ.get("TACA_PROBE_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"taca-probe: internal error: {type(e).__name__}: {first} (set TACA_PROBE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
