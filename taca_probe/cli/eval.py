"""``taca-probe eval``: the shapes model's exact compositional benchmark (held-out prompts x seeds)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import TacaProbeError
from ..models import load_pipeline
from ..schedules import parse
from ..shapes import dataset as ds
from ..shapes.benchmark import DEFAULT_SEEDS, QUICK_SEEDS, _call_settings, format_table, run_benchmark
from .args import Deprecated, call_args, check_json, check_out, emit, json_args, model_args, path_arg, positive_int, \
    resample_args, seeds


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` command to ``taca-probe``'s subparsers; returns its parser (``func``: :func:`cmd_eval`)."""
    p = subparsers.add_parser(
        "eval", parents=[model_args(), call_args(size=False), resample_args(2000),
                         json_args("the full result (aggregates and per-image detections)")],
        help="compositional benchmark: held-out shapes prompts x seeds, scored exactly "
        "(colour, shape, binding, spatial)",
        description="Generate the shapes dataset's held-out prompts (compositions never seen in training) once per "
        "seed under each --schedule, detect every object's colour, shape and position by image analysis, and "
        "score colour, shape, colour-shape binding and spatial relation with bootstrap 95% intervals. "
        "By default a quick preset: seed 0 only, 44 images a schedule (4 one-object + 40 two-object prompts; "
        "about 1 min a schedule on a CPU core). It shows binding and spatial relation against chance "
        "(two-object intervals about +-0.15); it cannot judge one-object prompts (n = 4) or resolve "
        "differences between schedules. --full runs the protocol of the README's table: seeds 0-39, 1760 images a "
        "schedule (1600 two-object images, paired across schedules by prompt and seed: 95% intervals of "
        "a schedule-minus-baseline difference within +-0.03), about 22 min a schedule on a CPU core.",
    )
    p.add_argument("--schedule", action="append", default=None,
                   help="TACA schedule, repeatable to compare several (default: none = the stock model)")
    p.add_argument("--seeds", type=seeds, default=None,
                   help="seeds per prompt (default: 0, the quick preset; --full: 0-39)")
    p.add_argument("--full", action="store_true",
                   help="the full protocol of the README's results: seeds 0-39 (40 x 44 images a schedule, about "
                   "22 min a schedule on a CPU core) instead of the quick preset")
    p.add_argument("--prompt-set", choices=["all", "one", "two"], default=None,
                   help="held-out one-object prompts, two-object prompts, or both (default all)")
    p.add_argument("--prompt", action="append",
                   help="a prompt of the shapes grammar instead of the held-out set (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per pipeline call (default 16)")
    p.add_argument("--bootstrap", dest="n_resamples", type=positive_int, action=Deprecated, new="--n-resamples",
                   help=argparse.SUPPRESS)  # one name for one setting across commands
    p.add_argument("--save-images", type=path_arg, metavar="DIR",
                   help="also save the generated images under DIR/NN_<schedule>/")
    p.set_defaults(func=cmd_eval)
    return p


def _estimate_seconds(pipe: Any, prompts: Sequence[str], n_images: int, call: dict[str, Any], batch_size: int) -> float:
    """Seconds for one schedule: one full batch timed at 1 and 2 steps (fixed cost + cost a step)."""
    kwargs = _call_settings(pipe, call)
    steps = int(kwargs.pop("num_inference_steps", 28))
    # as many images as the run's batches hold (prompts x seeds), not one per prompt: 1 prompt x 40 seeds is 3 batches
    batch = [prompts[i % len(prompts)] for i in range(min(batch_size, n_images))]
    pipe.set_progress_bar_config(disable=True)

    def timed(n_prompts: int, n_steps: int) -> float:
        gens = [torch.Generator("cpu").manual_seed(0) for _ in range(n_prompts)]
        t0 = time.perf_counter()
        pipe(batch[:n_prompts], num_inference_steps=n_steps, generator=gens, **kwargs)
        return time.perf_counter() - t0

    timed(1, 1)  # warm-up: first calls pay for allocation and kernel selection
    one, two = timed(len(batch), 1), timed(len(batch), 2)
    per_step = max(two - one, 0.0)
    per_batch = max(one - per_step, 0.0) + steps * per_step
    return per_batch * -(-n_images // max(1, len(batch)))


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``taca-probe eval``: print the table, optionally write JSON. Returns the exit status."""
    schedules = list(dict.fromkeys(parse(s).spec for s in (args.schedule or ["none"])))  # each once; before loading
    if args.prompt and args.prompt_set:  # else one of them is silently not what runs
        raise TacaProbeError("--prompt replaces the held-out set; give either --prompt or --prompt-set")
    specs = [ds.parse_prompt(p) for p in args.prompt] if args.prompt else ds.held_out_prompts(args.prompt_set or "all")
    prompts = list(dict.fromkeys(p.text for p in specs))  # a prompt given twice (any spelling) is sampled once
    check_json(args.json)  # now: the evaluation would be lost when the write fails at the end
    if args.save_images:
        check_out(Path(args.save_images), flag="--save-images")
    if args.full and args.seeds is not None:
        raise TacaProbeError(f"--full fixes the seeds (0-{DEFAULT_SEEDS[-1]}); give either --full or --seeds")
    seeds = list(DEFAULT_SEEDS) if args.full else list(QUICK_SEEDS) if args.seeds is None else args.seeds
    preset = ("full protocol" if args.full else "custom seeds" if args.seeds is not None
              else f"quick preset (--full: {len(DEFAULT_SEEDS)} seeds)")
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    n_images = len(prompts) * len(seeds)
    eta = _estimate_seconds(pipe, prompts, n_images, call, args.batch_size) * len(schedules)
    eta_text = f"{eta:.0f} s" if eta < 90 else f"{eta / 60:.0f} min"
    print(f"eval: {len(prompts)} prompts x {len(seeds)} seed(s) x {len(schedules)} schedule(s) = "
          f"{n_images * len(schedules)} images, {preset}; about {eta_text} on this machine", file=sys.stderr)
    bar = tqdm(total=n_images * len(schedules), unit="image", file=sys.stderr, desc="eval")
    seen: dict[str, int] = {}

    def progress(spec: str, k: int, n: int) -> None:
        bar.set_description_str(spec)
        bar.update(k - seen.get(spec, 0))
        seen[spec] = k

    try:
        result = run_benchmark(pipe, schedules, prompts=prompts, seeds=seeds, call=call, batch_size=args.batch_size,
                               n_boot=args.n_resamples, save_images=args.save_images, progress=progress)
    finally:
        bar.close()
    result["model"] = str(args.model)
    emit(args, result, format_table(result), indent=1)
    return 0
