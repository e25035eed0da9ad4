"""Argument types, shared parent parsers and input checks of the ``taca-probe`` commands.

Every flag is defined once, in a parent-parser factory; a new parser each call, because argparse
shares action objects between a parent and its children (a default changed for one would change for all).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TacaProbeError
from ..models import DEFAULT_MODEL, EMBEDDED_MODELS
from ..schedules import FORMS
from ..selection import MAX_INT, int_ranges, is_seed
from ..store import is_store

EMBEDDED_NOTE = (
    "The default model, shapes, is a tiny SD3 trained on coloured shapes and shipped in the package; the other "
    "embedded models (tiny-sd3, tiny-sd35, tiny-flux) have RANDOM weights: they exercise the machinery, not the "
    "science."
)
#: Largest image side accepted before a model loads (SD3 models then check their own position table).
MAX_IMAGE_SIDE = 4096
#: More denoising steps than a scheduler has training timesteps is a typo.
MAX_STEPS = 1000


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        # main() prints "taca-probe: error: "; name only the subcommand here, not the program twice
        where = self.prog.removeprefix("taca-probe").strip()
        raise TacaProbeError(f"{where + ': ' if where else ''}{message}{_did_you_mean(message)} (see --help)")


def _did_you_mean(message: str) -> str:
    """'; did you mean 'record'?' for argparse's "invalid choice: 'recrod' (choose from ...)"."""
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not m:
        return ""
    choices = re.findall(r"'?([\w.:@-]+)'?", m.group(2))
    close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _ints(what: str, example: str):
    """An argparse type: ``0,1,2`` or ``0-3`` or a mix, refused with the valid form."""

    def parse(text: str) -> list[int]:
        try:
            return int_ranges(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad {what} {text!r}: {e}; expected e.g. {example}") from None

    return parse


seeds = _ints("seeds", f"0,1,2 or 0-7 (integers 0..{MAX_INT})")
int_list = _ints("step list", "0,1,2 or 0-3")


def bounded(lo: float, hi: float, *, integer: bool = True):
    """An argparse type: an integer (or a finite number) in ``lo..hi``, refused before any model loads."""
    kind, span = ("an integer", f"{lo}..{hi}") if integer else ("a finite number", f"{lo:g}..{hi:g}")

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"must be {kind} in {span}, got {text!r}")
        return value

    return parse


positive_int = bounded(1, MAX_INT)


def path_arg(text: str) -> str:
    """An argparse type: a path, refused when empty (``Path('')`` is the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("empty path; name a file or folder")
    return text


def floats(text: str) -> list[float]:
    """``1.0,1.2,1.5`` -> list of floats; an empty or other part is refused by name, as in ``--seeds``."""
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad number list {text!r}: {part.strip()!r} is not a number; "
                                             "expected e.g. 1.0,1.2,1.5") from None
    return values


def schedule_help(default: str | None) -> str:
    """The --schedule help: its default (stated once, by the caller's parser) and the forms."""
    when = {None: "no default", "none": "default none: the stock model",
            "step:1.2@970": "default step:1.2@970, the paper's rule"}.get(default, f"default {default}")
    return f"gamma schedule ({when}; 'none' = stock model). Forms: " + " | ".join(
        line.strip() for line in FORMS.strip().splitlines() if line.strip())


class Deprecated(argparse.Action):
    """An old spelling that still works: stores into ``dest`` and says the new one on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"taca-probe: {option_string} is deprecated here; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def device_args() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu)")
    return p


def model_args() -> argparse.ArgumentParser:
    p = device_args()
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"embedded name ({', '.join(EMBEDDED_MODELS)}), a local diffusers folder, or a hub id already "
                   f"in the local Hugging Face cache (default: {DEFAULT_MODEL}, the trained shapes model)")
    return p


def sampling_args() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", type=path_arg, metavar="FILE",
                   help="prompts, one per line, or JSONL with 'prompt' and 'seed'")
    p.add_argument("--seeds", type=seeds, default=[0], help="seeds for every prompt, e.g. 0,1,2 or 0-7 (default 0)")
    return call_args(p)


def call_args(p: argparse.ArgumentParser | None = None, *, size: bool = True) -> argparse.ArgumentParser:
    """--steps, --guidance and (``size``) --height, --width, --max-sequence-length: the pipeline call."""
    p = p or _parent()
    p.add_argument("--steps", type=bounded(1, MAX_STEPS), default=None,
                   help="denoising steps (default: the model's recommended, else 28)")
    p.add_argument("--guidance", type=bounded(0.0, 100.0, integer=False), default=None,
                   help="guidance scale (default: the model's or pipeline's)")
    if size:
        for side in ("height", "width"):
            p.add_argument(f"--{side}", type=bounded(16, MAX_IMAGE_SIDE), default=None,
                           help=f"image {side} in pixels (default: the model's)")
        p.add_argument("--max-sequence-length", type=bounded(1, 512), default=None, metavar="N",
                       help="T5 text length (default: the model's recommended, else the pipeline's)")
    return p


def json_args(what: str = "the result") -> argparse.ArgumentParser:
    """--json [PATH]: write JSON to PATH, or to stdout alone with '-' or no PATH."""
    p = _parent()
    p.add_argument("--json", nargs="?", type=path_arg, const="-", default=None, metavar="PATH",
                   help=f"write {what} as JSON to PATH ('-' or no PATH: to stdout, instead of the text)")
    return p


def check_json(path: str | None) -> None:
    """Refuse a --json file that cannot be written (no such folder, a folder, inside a store) before the work."""
    if not path or path == "-":
        return
    out = Path(path)
    if not out.absolute().parent.is_dir():
        raise TacaProbeError(f"--json: folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise TacaProbeError(f"--json {str(out)!r} is a folder; name a file")
    check_out(out, flag="--json", folder=False)


def write_json(path: str, text: str) -> None:
    """What --json asks for: ``text`` to stdout ('-') or into the file ``path``."""
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n", encoding="utf-8")


def emit(args: argparse.Namespace, result: Any, text: str, indent: int = 2) -> None:
    """Print ``text`` and write ``result`` as --json asks: with '-' the JSON alone, so that stdout parses."""
    if args.json != "-":
        print(text)
    if args.json:
        write_json(args.json, json.dumps(result, indent=indent))


def lora_args() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--lora", type=path_arg, default=None,
                   help="LoRA (path or loaded adapter name) active exactly where gamma != 1")
    p.add_argument("--lora-scale", type=bounded(-100.0, 100.0, integer=False), default=1.0,
                   help="LoRA weight while active (default 1)")
    return p


def recording_args(what: str) -> argparse.ArgumentParser:
    """--maps, --branch, --resume / --overwrite of a command that records into ``what``."""
    p = _parent()
    p.add_argument("--maps", default=None, metavar="SPEC",
                   help="also record per-token attention maps for a selection (needed for Fig. 3), e.g. "
                   "'steps=0-4;layers=all;tokens=prompt' (default: no maps)")
    p.add_argument("--branch", default="cond", choices=["cond", "uncond", "both"],
                   help="CFG branch to record (default cond; both adds a branch dimension)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help=f"complete an existing {what} (same settings)")
    group.add_argument("--overwrite", action="store_true", help=f"replace an existing {what}")
    return p


def resample_args(n_resamples: int) -> argparse.ArgumentParser:
    """--n-resamples of the commands that give bootstrap intervals."""
    p = _parent()
    p.add_argument("--n-resamples", type=bounded(100, 1_000_000), default=n_resamples,
                   help=f"bootstrap resamples (default {n_resamples})")
    return p


def comparison_args(n_resamples: int) -> argparse.ArgumentParser:
    """--baseline, --treated, --n-resamples, --branch of the commands that compare runs."""
    p = argparse.ArgumentParser(add_help=False, parents=[resample_args(n_resamples)])
    p.add_argument("stores", nargs="+", type=path_arg, metavar="STORE", help="run stores and/or sweep folders")
    p.add_argument("--baseline", default=None, metavar="STORE|SPEC",
                   help="the baseline run (default: the one recorded with schedule none)")
    p.add_argument("--treated", default=None, metavar="STORE|SPEC",
                   help="the TACA run compared with it (default: step:1.2@970 if present, else the first other)")
    p.add_argument("--branch", default=None, choices=["cond", "uncond"], help="CFG branch of stores that hold both")
    return p


def bench_args(repeats: int) -> argparse.ArgumentParser:
    p = device_args()
    p.add_argument("--repeats", type=positive_int, default=repeats, help=f"timed repeats per variant (default {repeats})")
    # more threads than cores times nothing useful; 100000 crashed torch's thread pool
    p.add_argument("--threads", type=bounded(1, os.cpu_count() or 1), default=1,
                   help="CPU threads, at most this machine's cores (default 1: steadier timings)")
    return p


def short_prompt(prompt: str, width: int = 40) -> str:
    """A prompt for a progress bar: cut at a word, never inside one."""
    return textwrap.shorten(" ".join(prompt.split()), width, placeholder=" …")


def check_out(path: Path, *, store: bool = False, flag: str = "--out", folder: bool = True) -> None:
    """Refuse an output path under a file, in a store or in a folder that cannot be written, before loading a model.

    ``store``: ``path`` may itself be a store (``record`` resumes or replaces its own ``--out``). ``flag``: the
    option that named ``path``, for the message. ``folder``: ``path`` names a folder (a store is one), not a file.
    """
    if folder and path.exists() and not path.is_dir():
        raise TacaProbeError(f"{flag} {str(path)!r} is a file; name a folder")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise TacaProbeError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    # anything written into a store's folder makes the store unreadable ("damaged") to every command
    resolved = path.resolve()
    holder = next((f for f in [*([] if store else [resolved]), *resolved.parents] if is_store(f)), None)
    if holder is not None:
        where = "a taca-probe store" if holder == resolved else f"inside the taca-probe store {str(holder)!r}"
        raise TacaProbeError(f"{flag} {str(path)!r} is {where}; choose a folder outside any store")
    # an existing folder is written into (a store resumed, images added), a new one is made in its parent
    where = path if folder and path.is_dir() else parent
    if not os.access(where, os.W_OK | os.X_OK):
        raise TacaProbeError(f"{flag} {str(path)!r}: cannot write in {str(where)!r} (permission denied or read-only)")


def refuse_to_replace(out: Path, paths: Sequence[Path], overwrite: bool, what: str) -> None:
    """Before any work: refuse to replace files of ``paths`` that an earlier ``what`` left in ``out``, unless
    ``--overwrite`` (files are named by position, so another run's files of the same names are not its own)."""
    taken = [p for p in paths if p.exists()]
    if taken and not overwrite:
        more = f" and {len(taken) - 1} more of this {what}'s file names" if len(taken) > 1 else ""
        raise TacaProbeError(f"--out {str(out)!r} already holds {taken[0].relative_to(out)}{more}; pass --overwrite "
                             "to replace them or choose another --out")


def _printable(text: str) -> bool:
    return any(c.isprintable() and not c.isspace() for c in text)  # NULs and control bytes alone are no prompt


def read_prompts(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """(prompt, seeds) pairs from --prompt and --prompts FILE (text: one a line; JSONL: prompt, seed)."""
    items: list[tuple[str, list[int]]] = [(p, args.seeds) for p in (args.prompt or [])]
    if any(not _printable(p) for p, _ in items):
        raise TacaProbeError("--prompt: a prompt must be non-empty text")
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise TacaProbeError(f"prompt file {str(path)!r} " + ("is not a file" if path.exists() else "does not exist"))
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no part of the first line
        except UnicodeDecodeError as e:
            raise TacaProbeError(f"prompt file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
        # lines end at "\n" only: str.splitlines would also split at U+2028 and other separators
        for n, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith("{"):
                if not _printable(line):
                    raise TacaProbeError(f"{path}:{n}: no printable character in {line[:20]!r}; a prompt must be text")
                items.append((line, args.seeds))
                continue
            try:
                rec = json.loads(line)
                prompt = rec["prompt"]
            except (ValueError, KeyError, TypeError):
                raise TacaProbeError(f"{path}:{n}: expected a JSON object with 'prompt' (and optional 'seed')") from None
            if not isinstance(prompt, str) or not _printable(prompt):
                raise TacaProbeError(f"{path}:{n}: 'prompt' must be non-empty text, got {prompt!r}")
            if "seed" in rec and not is_seed(rec["seed"]):  # not a bool, not 1.7
                raise TacaProbeError(f"{path}:{n}: seed {rec['seed']!r} is not an integer in 0..{MAX_INT}")
            items.append((prompt, [rec["seed"]] if "seed" in rec else args.seeds))
    if not items:
        raise TacaProbeError("no prompt given: use --prompt TEXT (repeatable) or --prompts FILE")
    return items
