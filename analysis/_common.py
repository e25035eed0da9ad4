"""Shared command-line handling of the figure scripts in this folder (public API only).

Each script renders its figure from stores or sweep folders given on the command line; with none,
it first records what it needs on the embedded default model (``taca_probe.DEFAULT_MODEL``, with
the model's recommended call settings), resuming an earlier recording in ``--record-dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import taca_probe
from taca_probe.selection import int_ranges
from taca_probe.sweep import SweepError

#: Prompts in the grammar of the embedded shapes model (objects it saw in training).
DEFAULT_PROMPTS = (
    "a red circle to the left of a blue triangle",
    "a green square above a yellow circle",
    "a blue circle below a red square",
    "a yellow square to the right of a green triangle",
)
ROOT = Path(__file__).resolve().parent.parent


def parser(description: str, default_record_dir: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("stores", nargs="*", metavar="STORE",
                   help="run stores and/or sweep folders (default: record them first, see --record-dir)")
    p.add_argument("--out", default=str(ROOT / "runs" / "figures"), help="output folder of the figures")
    p.add_argument("--format", default="png,pdf", help="comma list of png, pdf, svg")
    rec = p.add_argument_group("recording (only when no STORE is given)")
    rec.add_argument("--record-dir", default=str(ROOT / "runs" / default_record_dir),
                     help="where to record (resumed if it exists)")
    rec.add_argument("--model", default=taca_probe.DEFAULT_MODEL,
                     help=f"model to record on (default {taca_probe.DEFAULT_MODEL})")
    rec.add_argument("--prompt", action="append", help="a prompt (repeatable; default: shapes prompts)")
    rec.add_argument("--seeds", type=int_ranges, default=None, help="seeds, e.g. 0,1,2 or 0-3")
    rec.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's recommended)")
    rec.add_argument("--height", type=int, default=None)
    rec.add_argument("--width", type=int, default=None)
    rec.add_argument("--max-sequence-length", type=int, default=None)
    rec.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def record(args: argparse.Namespace, *, schedules: Sequence[str], seeds: Sequence[int], maps: str | None = None,
           n_prompts: int = len(DEFAULT_PROMPTS)) -> Path:
    """Record (or resume) a sweep of ``schedules`` into ``args.record_dir``; returns the folder."""
    folder = Path(args.record_dir)
    prompts = args.prompt or list(DEFAULT_PROMPTS[:n_prompts])
    seeds = args.seeds or list(seeds)
    call = {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
            "max_sequence_length": args.max_sequence_length}
    mode = "resume" if (folder / "sweep.json").is_file() else "create"
    print(f"recording {len(schedules)} schedule(s) x {len(prompts)} prompt(s) x {len(seeds)} seed(s) on "
          f"{args.model} into {folder} ({mode})", file=sys.stderr)
    try:
        return taca_probe.run_sweep(args.model, folder, prompts=prompts, seeds=seeds, schedules=list(schedules),
                                    maps=maps, mode=mode, call=call, device=args.device)
    except SweepError as e:
        if mode != "resume":
            raise
        # the folder holds another recording: it is kept, and the user needs a way to record these settings
        raise SweepError(f"{e}; to record these settings, give another --record-dir") from None


def floats(text: str) -> list[float]:
    """A comma list of numbers, as an argparse type: a bad one is a usage error, not a traceback."""
    return [float(v) for v in text.split(",") if v.strip()]


def formats(args: argparse.Namespace) -> list[str]:
    return [f.strip() for f in args.format.split(",") if f.strip()]


def run(main) -> None:
    """Call ``main()``; bad input ends in one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except taca_probe.TacaProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
