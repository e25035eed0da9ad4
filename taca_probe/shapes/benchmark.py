"""The compositional benchmark: generate held-out prompts x seeds under TACA schedules, score exactly.

Python API: :func:`generate_images`, :func:`run_benchmark`, :func:`format_table`; the command line
``taca-probe eval`` is :mod:`taca_probe.cli.eval`.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import TacaProbeError
from ..intervention import taca
from ..models import call_settings
from ..schedules import parse
from ..sweep import schedule_slug
from . import dataset as ds
from . import evaluator as ev

__all__ = ["format_table", "generate_images", "record_scores", "run_benchmark"]

#: Seeds of the full protocol (``taca-probe eval --full``; the README's results): 40 two-object prompts x 40
#: seeds = 1600 paired images a schedule: on the shipped model a paired difference's 95% interval is within
#: +-0.03 (binding outcomes flip in ~25% of pairs, nearly all of its variance within prompts).
DEFAULT_SEEDS: tuple[int, ...] = tuple(range(40))
#: Seeds of the quick preset (``taca-probe eval`` without --full or --seeds).
QUICK_SEEDS: tuple[int, ...] = (0,)
#: Width of the printed table.
TABLE_WIDTH = 100


def _call_settings(pipe: Any, overrides: dict[str, Any] | None) -> dict[str, Any]:
    # The evaluator's thresholds are defined at the dataset's resolution.
    return call_settings(pipe, overrides, default_steps=None, default_size=ds.IMAGE_SIZE)


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    schedule: str = "none",
    call: dict[str, Any] | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], list[int], list[Any]]:
    """Generate every prompt once per seed with a TACA schedule.

    Parameters
    ----------
    pipe : diffusers.DiffusionPipeline
        Normally ``load_pipeline("shapes")``.
    prompts : sequence of str
    seeds : sequence of int
        Image ``(prompt, seed)`` starts from ``torch.Generator("cpu").manual_seed(seed)``: the same
        image whatever the batching.
    schedule : str
        TACA schedule (``"none"``: the stock model); see :mod:`taca_probe.schedules`.
    call : dict, optional
        ``pipe(...)`` arguments on top of :func:`taca_probe.models.model_call_defaults`.
    batch_size : int
        Images per pipeline call.
    progress : callable, optional
        Called with (done, total) after each batch.

    Returns
    -------
    prompts, seeds, images : lists
        One entry per image, prompt-major.
    """
    if batch_size < 1:
        raise TacaProbeError(f"batch size must be positive, got {batch_size}")
    kwargs = _call_settings(pipe, call)
    plan = [(p, s) for p in prompts for s in seeds]
    images: list[Any] = []
    pipe.set_progress_bar_config(disable=True)
    with taca(pipe, schedule):
        for start in range(0, len(plan), batch_size):
            chunk = plan[start : start + batch_size]
            gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
            out = pipe([p for p, _ in chunk], generator=gens, **kwargs)
            images.extend(out.images)
            if progress is not None:
                progress(len(images), len(plan))
    return [p for p, _ in plan], [s for _, s in plan], images


def run_benchmark(
    pipe: Any,
    schedules: Sequence[str] = ("none",),
    *,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    call: dict[str, Any] | None = None,
    batch_size: int = 16,
    n_boot: int = 2000,
    save_images: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate and score held-out prompts under each schedule.

    Parameters
    ----------
    pipe : diffusers.DiffusionPipeline
    schedules : sequence of str
        TACA schedules to compare (validated before any generation).
    prompts : sequence of str, optional
        Prompts of the shapes grammar; default :func:`~taca_probe.shapes.dataset.held_out_prompts`.
    seeds : sequence of int
        Seeds per prompt.
    call : dict, optional
        ``pipe(...)`` overrides (e.g. ``num_inference_steps``, ``guidance_scale``).
    batch_size, n_boot : int
        Images per pipeline call; bootstrap resamples of the intervals.
    save_images : path, optional
        Also save every image as ``<dir>/<NN>_<schedule>/<index>-seed<seed>.png`` (NN: the schedule's position).
    log : callable, optional
        Receives progress lines.
    progress : callable, optional
        Called after each batch with (schedule, images done, images of this schedule).

    Returns
    -------
    dict
        ``call`` (the pipe arguments used), ``seeds``, ``prompts``, ``chance``, and ``schedules``:
        schedule spec -> {``aggregate``: category -> {mean, low, high, n_images, n_prompts},
        ``difference`` (after the first: paired, against it), ``seconds``, ``images``: per-image records}.

    Raises
    ------
    TacaProbeError
        On a bad schedule or a prompt outside the grammar (before anything is generated).
    """
    specs = [parse(s).spec for s in schedules]  # ScheduleError (one line) on a bad one
    texts = [p.text for p in ds.held_out_prompts()] if prompts is None else [ds.parse_prompt(p).text for p in prompts]
    if not seeds:
        raise TacaProbeError("no seeds given")
    result: dict[str, Any] = {"call": _call_settings(pipe, call), "seeds": list(seeds), "prompts": texts,
                              "chance": ev.chance_levels(), "schedules": {}}
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        quarter = 0  # the last quarter of the images logged

        def batch_done(k: int, n: int, spec: str = spec, t0: float = t0) -> None:
            nonlocal quarter
            if progress is not None:
                progress(spec, k, n)
            if log is not None and (k == n or k // max(1, n // 4) != quarter):
                quarter = k // max(1, n // 4)
                log(f"{spec}: {k}/{n} images ({time.perf_counter() - t0:.0f} s)")

        p_list, s_list, images = generate_images(pipe, texts, seeds, schedule=spec, call=call, batch_size=batch_size,
                                                 progress=batch_done)
        scores = ev.evaluate_images(p_list, images)
        entry: dict[str, Any] = {"aggregate": {k: vars(v) for k, v in ev.aggregate(scores, n_boot=n_boot).items()}}
        if save_images is not None:
            # numbered as a sweep's folders: specs that slug alike stay apart; cut, as a long table passed 255 bytes
            folder = Path(save_images) / f"{i:02d}_{schedule_slug(spec)}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, (img, seed) in enumerate(zip(images, s_list)):
                img.save(folder / f"{j:04d}-seed{seed}.png")
        if i == 0:
            base_scores = scores
        else:  # same prompts and seeds: compare image by image with the first schedule
            diff = ev.paired_difference(base_scores, scores, n_boot=n_boot)
            entry["difference"] = {"versus": specs[0], **{k: vars(v) for k, v in diff.items()}}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["images"] = [dict(r.to_dict(), seed=s) for r, s in zip(scores, s_list)]
        result["schedules"][spec] = entry
    return result


def record_scores(folder: str | Path, result: dict[str, Any]) -> Path:
    """Record a benchmark result's aggregates in a model folder's ``manifest.json``.

    Parameters
    ----------
    folder : path
        A pipeline folder exported by :mod:`taca_probe.shapes.train` (has ``manifest.json``).
    result : dict
        From :func:`run_benchmark`.

    Returns
    -------
    pathlib.Path
        The manifest (existing scores of other schedules are kept).
    """
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise TacaProbeError(f"no manifest.json in {str(folder)!r}; pass a folder written by taca_probe.shapes.train")
    manifest = json.loads(path.read_text())
    scores = manifest.setdefault("scores", {})
    for spec, r in result["schedules"].items():
        scores[spec] = {"aggregate": r["aggregate"], "call": result["call"], "seeds": result["seeds"],
                        "n_prompts": len(result["prompts"])}
        if "difference" in r:
            scores[spec]["difference"] = r["difference"]
    scores["chance"] = result["chance"]
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def format_table(result: dict[str, Any], *, width: int = TABLE_WIDTH) -> str:
    """Plain text, one block per schedule (and per paired difference), no line wider than ``width``.

    Each block is the schedule on its own line, then ``category  mean [low, high]`` cells, as
    many a line as fit.
    """
    runs = result["schedules"]
    cats = [c for c in ev.CATEGORIES if any(c in r["aggregate"] for r in runs.values())]

    def cells(d: dict[str, Any], sign: str = "") -> list[str]:
        return [f"{c} {d[c]['mean']:{sign}.3f} [{d[c]['low']:{sign}.2f}, {d[c]['high']:{sign}.2f}]"
                for c in cats if c in d]

    blocks = [(spec, cells(r["aggregate"])) for spec, r in runs.items()]
    blocks += [(f"{spec} - {r['difference']['versus']} (paired difference)", cells(r["difference"], "+"))
               for spec, r in runs.items() if r.get("difference")]
    cell = max((len(x) for _, cells in blocks for x in cells), default=0) + 2
    per_line = max(1, (width - 2) // cell)
    lines: list[str] = []
    for title, cells in blocks:
        lines.append(title)
        for i in range(0, len(cells), per_line):
            lines.append("  " + "".join(x.ljust(cell) for x in cells[i : i + per_line]).rstrip())
    first = next(iter(runs.values()))["aggregate"]
    sizes = ", ".join(
        f"{kind}-object: {first[f'{kind}.colour']['n_images']} images of {first[f'{kind}.colour']['n_prompts']} prompts"
        for kind in ("one", "two") if f"{kind}.colour" in first
    )
    chance = ", ".join(f"{k} {v:.3f}" for k, v in result["chance"].items() if k in cats)
    call = ", ".join(f"{k}={v}" for k, v in result["call"].items())
    s = result["seeds"]  # "a..b" only for a run of consecutive seeds: "3..2" would misstate seeds 3, 1, 2
    seeds = f"{s[0]}..{s[-1]}" if s == list(range(s[0], s[0] + len(s))) else ",".join(map(str, s))
    notes = [f"n: {sizes}", "95% intervals: prompt-cluster bootstrap; 'A - B': paired difference, same seeds",
             f"chance: {chance}", f"call: {call}; seeds {seeds}"]
    lines += [line for note in notes for line in textwrap.wrap(note, width, subsequent_indent="  ")]
    return "\n".join(lines)
