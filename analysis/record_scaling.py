"""Per-sample cost of ``record`` against the store's size: a benchmark, not a test.

Two measurements, both through the loop behind ``taca-probe record``
(:func:`taca_probe.runner.record_plan`; tiny-sd3, 1 step, 64 px):

- ``sequential``: records N planned samples and compares the first and the last window (median
  and 10th percentile of the seconds per sample, and of the seconds spent in
  ``RunWriter.write_sample``). This is the figure the acceptance names, but on a shared machine
  the CPU's speed drifts by ±30 % over tens of seconds, and the two windows are far apart in time.
- ``interleaved``: one store filled to N - window samples and one fresh store, then one sample at
  a time into each, alternating (``record --resume`` stopped after each sample; only the sample
  itself is timed). The last samples of a full store and the first of an empty one are timed side
  by side, so drift cancels from their ratio.

``python analysis/record_scaling.py [--samples 200] [--window 20] [--out DIR]``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from taca_probe import load_pipeline
from taca_probe.runner import Target, record_plan
from taca_probe.store import RunWriter

CALL = {"num_inference_steps": 1, "height": 64, "width": 64}


class _Stop(Exception):
    """Ends a ``record_plan`` after the samples wanted (the store stays resumable, as after Ctrl-C)."""


def _summary(name: str, first: list[float], last: list[float]) -> dict[str, float]:
    out = {}
    for label, part in (("first", first), ("last", last)):
        out[f"{name}_{label}_median_s"] = round(statistics.median(part), 5)
        out[f"{name}_{label}_p10_s"] = round(statistics.quantiles(part, n=10)[0], 5)
    out[f"{name}_ratio_median"] = round(out[f"{name}_last_median_s"] / out[f"{name}_first_median_s"], 3)
    out[f"{name}_ratio_p10"] = round(out[f"{name}_last_p10_s"] / out[f"{name}_first_p10_s"], 3)
    return out


def _record(pipe, store: Path, plan: list, mode: str, stop_after: int | None = None) -> tuple[list[float], list[float]]:
    """Record ``plan`` (or its next ``stop_after`` unfinished samples) into ``store``. Returns the
    seconds of each sample, from the progress line before ``run.sample`` to ``on_sample`` after its
    write, and the progress lines' times (with the end of the last sample)."""
    started, times = [], []

    def done(*_):
        times.append(time.perf_counter() - started[-1])
        if stop_after is not None and len(times) == stop_after:
            raise _Stop

    try:
        record_plan(pipe, [Target("none", store)], plan, CALL, model="tiny-sd3", mode=mode, on_sample=done,
                    progress=lambda line: started.append(time.perf_counter()))
    except _Stop:
        pass
    return times, started + [time.perf_counter()]


def sequential(pipe, folder: Path, n: int, w: int) -> dict[str, float]:
    store_times = []
    write = RunWriter.write_sample

    def timed_write(self, *a, **k):
        t0 = time.perf_counter()
        write(self, *a, **k)
        store_times.append(time.perf_counter() - t0)

    RunWriter.write_sample = timed_write
    try:
        _, stamps = _record(pipe, folder / "sequential.zarr", [(f"prompt number {i}", 0) for i in range(n)], "create")
    finally:
        RunWriter.write_sample = write
    times = [b - a for a, b in zip(stamps, stamps[1:])]  # everything the loop does per sample
    return {**_summary("sample", times[:w], times[-w:]), **_summary("store", store_times[:w], store_times[-w:])}


def interleaved(pipe, folder: Path, n: int, w: int) -> dict[str, float]:
    plan = [(f"prompt number {i}", 0) for i in range(n)]
    full, fresh = folder / "full.zarr", folder / "fresh.zarr"
    _record(pipe, full, plan, "create", stop_after=n - w)
    _record(pipe, fresh, plan, "create", stop_after=1)
    first, last = [], []
    for j in range(w):  # ABBA: neither store is always timed first
        for store in ((full, fresh) if j % 2 == 0 else (fresh, full)):
            (last if store == full else first).extend(_record(pipe, store, plan, "resume", stop_after=1)[0])
    out = _summary("interleaved", first, last)
    out["interleaved_pair_ratio_median"] = round(statistics.median(b / a for a, b in zip(first, last)), 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for the stores and times.json (default: a temporary one)")
    args = p.parse_args()
    if not 2 <= 2 * args.window <= args.samples:
        p.error("need 2 <= 2 * --window <= --samples")
    torch.set_num_threads(1)
    folder = Path(args.out or tempfile.mkdtemp(prefix="record-scaling-"))
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("tiny-sd3", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    result = {"samples": args.samples, "window": args.window,
              **sequential(pipe, folder, args.samples, args.window),
              **interleaved(pipe, folder, args.samples, args.window)}
    (folder / "times.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
