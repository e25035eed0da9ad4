#!/usr/bin/env python
"""The gamma-schedule study on the shapes model: paired TACA-minus-baseline differences with intervals.

Subcommands (results under ``--results``, default ``analysis/results/shapes_study``):

    python analysis/shapes_study.py cfg        # guidance scale on *seen* prompts (never the held-out ones)
    python analysis/shapes_study.py generate --worker 0 --workers 2 --seeds 0-39
    python analysis/shapes_study.py analyze    # table.md + study.json from every worker's records
    python analysis/shapes_study.py suppression

``generate`` appends one JSON line per image (schedule, prompt, seed, scores, detections) to
``images-w<worker>.jsonl`` in seed-major order: every schedule of a seed before the next seed, so
the study can be stopped at any time and all schedules have the same seeds (pairs); rerunning
skips (schedule, seed) blocks already recorded. Worker k takes the seeds with ``seed % workers == k``.
Every schedule generates the 40 held-out two-object prompts per seed; ``none`` also the 4
held-out one-object prompts (the gamma = 1 figures).

``analyze`` pairs every schedule with ``none`` image by image (same prompt, same seed: the same
starting noise) over the (prompt, seed) pairs both have, and reports the mean difference with a
prompt-cluster bootstrap 95% interval (:func:`taca_probe.shapes.evaluator.paired_difference`).

``suppression`` records the visual->text attention mass (every layer, every step) for the baseline
and the paper's schedule on held-out prompts and tabulates it against the uniform reference
``n_txt / (n_txt + n_vis)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from taca_probe.selection import int_ranges

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "analysis" / "results" / "shapes_study"

BASELINE = "none"
#: The study's schedules: the paper's rule, constant gamma and a small gamma0 x t_thresh grid.
#: The official code's rule (first:1.2@3) is checked to be the same intervention as step:1.2@970
#: at the model's 25 steps (``same_as``) and then not generated twice.
SCHEDULES = (
    BASELINE,
    "step:1.2@970",
    "const:1.2",
    "step:1.5@970",
    "step:1.2@900",
    "step:1.5@900",
)
OFFICIAL = "first:1.2@3"


def _load(model: str, device: str = "cpu"):
    from taca_probe import load_pipeline

    return load_pipeline(model, device=device, dtype="fp32")


def gammas_per_step(pipe, spec: str) -> list[float]:
    """The gamma a schedule gives each denoising step of the model's default call (every layer)."""
    from taca_probe.models import model_call_defaults
    from taca_probe.schedules import parse

    call = model_call_defaults(pipe)
    n = int(call["num_inference_steps"])
    pipe.scheduler.set_timesteps(n)
    sched = parse(spec)
    out = []
    for i, t in enumerate(pipe.scheduler.timesteps.tolist()):
        out.append(round(float(sched.gamma(t=float(t), step=i, num_steps=n, layer="", block_type="joint")), 6))
    return out


# --------------------------------------------------------------------------------------------
# cfg: guidance scale chosen on seen prompts
# --------------------------------------------------------------------------------------------


def cmd_cfg(args: argparse.Namespace) -> int:
    from taca_probe.shapes import benchmark as bm
    from taca_probe.shapes import dataset as ds
    from taca_probe.shapes import evaluator as ev

    pipe = _load(args.model, args.device)
    rng = np.random.default_rng(12345)
    two = [p.text for p in ds.training_prompts() if p.relation is not None]
    one = [p.text for p in ds.training_prompts() if p.relation is None]
    prompts = [two[i] for i in rng.choice(len(two), args.n_two, replace=False)] + one
    out = {}
    for g in [float(x) for x in args.scales.split(",")]:
        t0 = time.perf_counter()
        p, s, images = bm.generate_images(pipe, prompts, [1000 + k for k in range(args.n_seeds)],
                                          call={"guidance_scale": g}, batch_size=20)
        agg = ev.aggregate(ev.evaluate_images(p, images), n_boot=500)
        out[g] = {k: vars(v) for k, v in agg.items()}
        print(f"cfg {g}: " + "  ".join(f"{k} {v.mean:.3f}" for k, v in agg.items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "cfg_seen_prompts.json").write_text(json.dumps(
        {"model": args.model, "prompts": prompts, "seeds": [1000 + k for k in range(args.n_seeds)], "scores": out},
        indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def _done_blocks(path: Path) -> set[tuple[str, int]]:
    done: set[tuple[str, int]] = set()
    if path.is_file():
        counts: dict[tuple[str, int], int] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                counts[(r["schedule"], r["seed"])] = counts.get((r["schedule"], r["seed"]), 0) + 1
        done = {k for k, n in counts.items() if n >= 40}
    return done


def cmd_generate(args: argparse.Namespace) -> int:
    from taca_probe.shapes import benchmark as bm
    from taca_probe.shapes import dataset as ds
    from taca_probe.shapes import evaluator as ev

    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    path = res / f"images-w{args.worker}.jsonl"
    done = _done_blocks(path)
    pipe = _load(args.model, args.device)
    call = dict(bm._call_settings(pipe, {"guidance_scale": args.guidance}))
    if args.worker == 0:
        (res / "call.json").write_text(json.dumps({"model": args.model, "call": call}, indent=1) + "\n")
    two = [p.text for p in ds.held_out_prompts("two")]
    one = [p.text for p in ds.held_out_prompts("one")]
    seeds = [s for s in int_ranges(args.seeds) if s % args.workers == args.worker]
    with path.open("a") as fh:
        for seed in seeds:
            for spec in SCHEDULES:
                if (spec, seed) in done:
                    continue
                prompts = two + (one if spec == BASELINE else [])
                t0 = time.perf_counter()
                p, s, images = bm.generate_images(pipe, prompts, [seed], schedule=spec,
                                                  call={"guidance_scale": args.guidance}, batch_size=args.batch_size)
                for r, sd in zip(ev.evaluate_images(p, images), s):
                    fh.write(json.dumps({"schedule": spec, "seed": sd, **r.to_dict()}) + "\n")
                fh.flush()
                print(f"[{time.strftime('%H:%M:%S')}] w{args.worker} seed {seed} {spec}: {len(images)} images "
                      f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# analyze
# --------------------------------------------------------------------------------------------


def _records(res: Path) -> list[dict]:
    out = []
    for path in sorted(res.glob("images-w*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _score(r: dict):
    from taca_probe.shapes import evaluator as ev

    return ev.PromptScore(r["prompt"], r["kind"], r["scores"])


def cmd_analyze(args: argparse.Namespace) -> int:
    from taca_probe.shapes import evaluator as ev

    res = Path(args.results)
    recs = _records(res)
    # Only seeds that every schedule finished (a stopped worker leaves a partial block behind).
    counts: dict[tuple[str, int], int] = {}
    for r in recs:
        if r["kind"] == "two":
            counts[(r["schedule"], r["seed"])] = counts.get((r["schedule"], r["seed"]), 0) + 1
    seeds_all = sorted({k[1] for k in counts})
    complete = {sd for sd in seeds_all if all(counts.get((spec, sd), 0) >= 40 for spec in SCHEDULES)}
    by: dict[str, dict[tuple[str, int], dict]] = {}
    for r in recs:
        if r["seed"] in complete:
            by.setdefault(r["schedule"], {})[(r["prompt"], r["seed"])] = r
    base = by.get(BASELINE, {})
    pipe = _load(args.model)
    study: dict = {"model": args.model, "chance": ev.chance_levels(), "schedules": {}}
    call_file = res / "call.json"
    if call_file.is_file():
        study["call"] = json.loads(call_file.read_text())["call"]
    study["gamma_per_step"] = {s: gammas_per_step(pipe, s) for s in (*SCHEDULES, OFFICIAL)}
    study["official_same_as_paper"] = study["gamma_per_step"][OFFICIAL] == study["gamma_per_step"]["step:1.2@970"]
    # gamma = 1: every baseline image (one- and two-object).
    keys_all = sorted(base)
    agg = ev.aggregate([_score(base[k]) for k in keys_all], n_boot=args.bootstrap)
    study["baseline"] = {k: vars(v) for k, v in agg.items()}
    study["baseline_seeds"] = sorted({k[1] for k in keys_all})
    rows = []
    for spec in SCHEDULES[1:]:
        other = by.get(spec, {})
        keys = sorted(k for k in other if k in base)
        if not keys:
            continue
        b = [_score(base[k]) for k in keys]
        o = [_score(other[k]) for k in keys]
        a_o = ev.aggregate(o, n_boot=args.bootstrap)
        a_b = ev.aggregate(b, n_boot=args.bootstrap)
        d = ev.paired_difference(b, o, n_boot=args.bootstrap)
        study["schedules"][spec] = {
            "n_pairs": len(keys), "seeds": sorted({k[1] for k in keys}),
            "aggregate": {k: vars(v) for k, v in a_o.items()},
            "baseline_on_same_pairs": {k: vars(v) for k, v in a_b.items()},
            "difference": {k: vars(v) for k, v in d.items()},
            "discordant": {c: float(np.mean([x.scores[c] != y.scores[c] for x, y in zip(b, o)]))
                           for c in ("binding", "spatial")},
        }
        rows.append(spec)
    (res / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    if args.record:  # the shipped model's manifest keeps the README's figures
        from taca_probe.shapes.benchmark import record_scores

        result = {"call": study.get("call", {}), "seeds": study["baseline_seeds"], "chance": study["chance"],
                  "prompts": sorted({k[0] for k in keys_all}),
                  "schedules": {BASELINE: {"aggregate": study["baseline"]}}}
        for spec, s in study["schedules"].items():
            result["schedules"][spec] = {"aggregate": s["aggregate"],
                                         "difference": {"versus": BASELINE, **s["difference"]}}
        print("recorded in", record_scores(args.record, result))

    def cell(s: dict, c: str, sign: bool = False) -> str:
        f = "{:+.3f} [{:+.2f}, {:+.2f}]" if sign else "{:.3f} [{:.2f}, {:.2f}]"
        return f.format(s[c]["mean"], s[c]["low"], s[c]["high"])

    lines = ["| schedule | n pairs | two: binding | two: spatial | two: shape | two: colour | "
             "binding diff | spatial diff | shape diff |", "|---|---|---|---|---|---|---|---|---|"]
    b2 = study["baseline"]
    lines.append(f"| `none` (gamma = 1) | {b2['two.binding']['n_images']} | {cell(b2, 'two.binding')} | "
                 f"{cell(b2, 'two.spatial')} | {cell(b2, 'two.shape')} | {cell(b2, 'two.colour')} | - | - | - |")
    for spec in rows:
        s = study["schedules"][spec]
        name = f"`{spec}`" + (f" = `{OFFICIAL}`" if spec == "step:1.2@970" and study["official_same_as_paper"] else "")
        lines.append(f"| {name} | {s['n_pairs']} | {cell(s['aggregate'], 'two.binding')} | "
                     f"{cell(s['aggregate'], 'two.spatial')} | {cell(s['aggregate'], 'two.shape')} | "
                     f"{cell(s['aggregate'], 'two.colour')} | {cell(s['difference'], 'two.binding', True)} | "
                     f"{cell(s['difference'], 'two.spatial', True)} | {cell(s['difference'], 'two.shape', True)} |")
    one = [f"one-object (gamma = 1): colour {cell(b2, 'one.colour')}, shape {cell(b2, 'one.shape')}, "
           f"n = {b2['one.colour']['n_images']} images of {b2['one.colour']['n_prompts']} prompts"]
    text = "\n".join(lines + [""] + one) + "\n"
    (res / "table.md").write_text(text)
    print(text)
    print("gamma per step:", json.dumps(study["gamma_per_step"]))
    return 0


# --------------------------------------------------------------------------------------------
# suppression
# --------------------------------------------------------------------------------------------


def cmd_suppression(args: argparse.Namespace) -> int:
    import taca_probe
    from taca_probe import open_sweep
    from taca_probe.shapes import dataset as ds

    res = Path(args.results)
    folder = res / "suppression_sweep"
    prompts = [p.text for p in ds.held_out_prompts("two")][:: max(1, 40 // args.n_prompts)][: args.n_prompts]
    mode = "resume" if (folder / "sweep.json").is_file() else "create"
    taca_probe.run_sweep(args.model, folder, prompts=prompts, seeds=[0], schedules=["none", "step:1.2@970"],
                         maps=None, mode=mode, call={"guidance_scale": args.guidance}, device="cpu")
    data = open_sweep(folder)
    n_txt, n_vis = int(data.attrs["n_txt"]), int(data.attrs["n_vis"])
    uniform = n_txt / (n_txt + n_vis)
    out: dict = {"prompts": prompts, "uniform_reference": uniform, "n_txt": n_txt, "n_vis": n_vis, "schedules": {}}
    for i, spec in enumerate(data["schedule"].values.tolist()):
        m = data["vis_txt_mass"].isel(schedule=i).mean(("sample", "head"))  # (step, layer)
        layers = [str(x) for x in data["layer"].values.tolist()] if "layer" in data.coords else list(range(m.sizes["layer"]))
        arr = m.transpose("step", "layer").values
        out["schedules"][str(spec)] = {
            "layers": layers,
            "by_step_layer": np.round(arr, 4).tolist(),
            "by_step": np.round(arr.mean(1), 4).tolist(),
            "by_layer": np.round(arr.mean(0), 4).tolist(),
            "fraction_below_uniform": float(np.mean(arr < uniform)),
        }
    (res / "suppression.json").write_text(json.dumps(out, indent=1) + "\n")
    base = out["schedules"]["none"]
    print(f"uniform reference {uniform:.3f}")
    print("by layer (mean over steps):", base["by_layer"])
    print("by step (mean over layers):", base["by_step"])
    print("fraction of (layer, step) cells below uniform:", base["fraction_below_uniform"])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where cfg and generate sample (fp32 either way)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cfg")
    c.add_argument("--scales", default="5,7,9")
    c.add_argument("--n-two", type=int, default=40)
    c.add_argument("--n-seeds", type=int, default=1)
    g = sub.add_parser("generate")
    g.add_argument("--worker", type=int, default=0)
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--seeds", default="0-23")
    g.add_argument("--guidance", type=float, default=None, help="default: the model's call_defaults")
    g.add_argument("--batch-size", type=int, default=20)
    a = sub.add_parser("analyze")
    a.add_argument("--bootstrap", type=int, default=2000)
    a.add_argument("--record", metavar="PIPELINE_DIR", default=None,
                   help="also record the figures in this model folder's manifest.json")
    s = sub.add_parser("suppression")
    s.add_argument("--n-prompts", type=int, default=8)
    s.add_argument("--guidance", type=float, default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    return {"cfg": cmd_cfg, "generate": cmd_generate, "analyze": cmd_analyze, "suppression": cmd_suppression}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
