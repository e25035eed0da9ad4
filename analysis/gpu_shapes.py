#!/usr/bin/env python
"""Issue 13's GPU run: train shapes-model variants side by side, evaluate each, study the best one.

Run by ``analysis/gpu_shapes.sh`` on the device machine (one H100/H200), from the repository root::

    python analysis/gpu_shapes.py --minutes 5.5 --deadline 530

1. Trains every variant of :data:`VARIANTS` at once on the one GPU (``taca_probe.shapes.train``,
   batches made by worker processes, the cosine fitted to the time budget).
2. Evaluates each (in parallel): the guidance scale on *seen* prompts (``shapes_study.py cfg``),
   then the held-out protocol at that scale (``taca-probe eval --full``, seeds 0-39, fp32).
3. Picks the variant with the best seen-prompt score (never the held-out one) and runs the
   schedule study's ``generate`` on it, seed-major, until the deadline.

Writes to ``$OUT``: ``pipelines-1.tgz``/``pipelines-2.tgz`` (the exported variants),
``summary.json`` (rewritten after every phase) and ``study/`` (records for ``shapes_study.py
analyze`` on the CPU here). Logs go to ``/tmp/gpu-shapes`` (the wrapper tars them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/gpu-shapes")
BIG_TEXT = ["--t5-dim", "128", "--t5-layers", "3", "--clip-hidden", "64"]
#: name -> extra training arguments. "warm" continues the shipped model (same architecture).
VARIANTS = {
    "warm": ["--init-from", str(ROOT / "taca_probe" / "shapes" / "weights"), "--lr", "5e-4"],
    "text": BIG_TEXT,
    "wide": ["--num-heads", "4", *BIG_TEXT],
    "wide-lr2": ["--num-heads", "4", *BIG_TEXT, "--lr", "2e-3"],
}
SCALES = (5.0, 8.0, 11.0)


def _launch(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)


def _seen_score(agg: dict) -> float:
    return agg["two.binding"]["mean"] + agg["two.spatial"]["mean"] + agg["one.shape"]["mean"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.5, help="training budget of every variant")
    p.add_argument("--deadline", type=float, default=530, help="seconds from start to stop the study")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workers", type=int, default=3, help="data worker processes per variant")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seeds", default="0-39", help="held-out seeds (the study's too); 0-39 is eval --full")
    p.add_argument("--cfg-seeds", type=int, default=4, help="seeds per seen prompt for the guidance scale")
    p.add_argument("--scales", default=",".join(map(str, SCALES)))
    args = p.parse_args()
    t0 = time.time()
    out = Path(os.environ.get("OUT", "gpu-results"))
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    summary: dict = {"variants": {n: {"args": VARIANTS[n]} for n in names}, "phases": {}}

    def save(phase: str) -> None:
        summary["phases"][phase] = round(time.time() - t0, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"[{time.time() - t0:6.1f} s] {phase}", flush=True)

    py = sys.executable
    procs = {
        n: _launch([py, "-m", "taca_probe.shapes.train", "--out", str(WORK / n), "--device", args.device, "--workers", str(args.workers),
                    "--batch-size", str(args.batch_size), "--minutes", str(args.minutes), "--fit-steps",
                    "--checkpoint-minutes", "1000", *VARIANTS[n]], WORK / f"train-{n}.log")
        for n in names
    }
    for n, proc in procs.items():
        summary["variants"][n]["train_rc"] = proc.wait()
        manifest = WORK / n / "pipeline" / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            summary["variants"][n].update({k: m.get(k) for k in ("steps_done", "total_steps", "train_wall_s",
                                                                  "final_loss_ema", "parameters")})
            summary["variants"][n]["schedule_steps"] = m["training"]["steps"]
    done = [n for n in names if (WORK / n / "pipeline" / "model_index.json").is_file()]
    for i, group in enumerate((done[:2], done[2:]), 1):
        if group:
            with tarfile.open(out / f"pipelines-{i}.tgz", "w:gz") as tar:
                for n in group:
                    tar.add(WORK / n / "pipeline", arcname=n)
    save("trained")

    # Guidance scale on seen prompts, then the held-out protocol at that scale, every variant at once.
    procs = {n: _launch([py, "analysis/shapes_study.py", "--model", str(WORK / n / "pipeline"), "--device", args.device,
                         "--results", str(WORK / f"study-{n}"), "cfg", "--scales", args.scales,
                         "--n-seeds", str(args.cfg_seeds)], WORK / f"cfg-{n}.log") for n in done}
    for n, proc in procs.items():
        proc.wait()
        path = WORK / f"study-{n}" / "cfg_seen_prompts.json"
        if path.is_file():
            scores = json.loads(path.read_text())["scores"]
            summary["variants"][n]["seen"] = scores
            summary["variants"][n]["guidance"] = float(max(scores, key=lambda g: _seen_score(scores[g])))
    save("cfg")
    rated = [n for n in done if "guidance" in summary["variants"][n]]
    procs = {n: _launch([py, "-m", "taca_probe", "eval", "--model", str(WORK / n / "pipeline"), "--device", args.device,
                         "--dtype", "fp32", "--seeds", args.seeds, "--batch-size", "220", "--guidance",
                         str(summary["variants"][n]["guidance"]), "--json", str(WORK / f"heldout-{n}.json")],
                        WORK / f"eval-{n}.log") for n in rated}
    for n, proc in procs.items():
        proc.wait()
        path = WORK / f"heldout-{n}.json"
        if path.is_file():
            res = json.loads(path.read_text())
            summary["variants"][n]["held_out"] = res["schedules"]["none"]["aggregate"]
    save("held_out")

    if not rated:
        return 1
    best = max(rated, key=lambda n: _seen_score(summary["variants"][n]["seen"][str(summary["variants"][n]["guidance"])]))
    summary["chosen"] = best
    save("chosen")
    study = _launch([py, "analysis/shapes_study.py", "--model", str(WORK / best / "pipeline"), "--device", args.device,
                     "--results", str(out / "study"), "generate", "--seeds", args.seeds, "--batch-size", "240",
                     "--guidance", str(summary["variants"][best]["guidance"])], WORK / "study.log")
    try:
        study.wait(timeout=max(1.0, args.deadline - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        study.kill()
        summary["study_stopped_at_deadline"] = True
    save("study")
    return 0


if __name__ == "__main__":
    sys.exit(main())
