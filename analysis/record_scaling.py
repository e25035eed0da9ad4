"""Per-sample cost of ``record`` against the store's size: a benchmark, not a test.

Records N planned samples (tiny-sd3, 1 step, 64 px) through the loop behind ``taca-probe record``
(:func:`taca_probe.runner.record_plan`) and prints, for the first and the last window, the median
and the 10th percentile of the seconds per sample, and of the seconds spent writing to the store
(``RunWriter.write_sample``). On a shared machine the medians follow the load; the percentiles and
the store part less so. ``python analysis/record_scaling.py [--samples 200] [--window 20] [--out DIR]``.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for the store and times.json (default: a temporary one)")
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.out or tempfile.mkdtemp(prefix="record-scaling-"))
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("tiny-sd3", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 1, "height": 64, "width": 64}
    plan = [(f"prompt number {i}", 0) for i in range(args.samples)]
    stamps, store_times = [], []
    write = RunWriter.write_sample

    def timed_write(self, *a, **k):
        t0 = time.perf_counter()
        write(self, *a, **k)
        store_times.append(time.perf_counter() - t0)

    RunWriter.write_sample = timed_write
    record_plan(pipe, [Target("none", folder / "s.zarr")], plan, call, model="tiny-sd3",
                progress=lambda line: stamps.append(time.perf_counter()))
    stamps.append(time.perf_counter())  # the end of the last sample
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    w = args.window
    result = {"samples": args.samples}
    for name, series in (("sample", times), ("store", store_times)):
        for label, part in (("first", series[:w]), ("last", series[-w:])):
            result[f"{name}_{label}_median_s"] = round(statistics.median(part), 5)
            result[f"{name}_{label}_p10_s"] = round(statistics.quantiles(part, n=10)[0], 5)
        result[f"{name}_ratio_median"] = round(result[f"{name}_last_median_s"] / result[f"{name}_first_median_s"], 3)
        result[f"{name}_ratio_p10"] = round(result[f"{name}_last_p10_s"] / result[f"{name}_first_p10_s"], 3)
    (folder / "times.json").write_text(json.dumps({**result, "times": times, "store_times": store_times}) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
