#!/usr/bin/env python
"""The gamma-schedule study on the shapes model: paired TACA-minus-baseline differences with intervals.

Subcommands (results under ``--results``, default ``analysis/results/shapes_study``):

    python analysis/shapes_study.py cfg        # guidance scale on *seen* prompts (never the held-out ones)
    python analysis/shapes_study.py generate --worker 0 --workers 2 --seeds 0-39
    python analysis/shapes_study.py analyze    # table.md + study.json from every worker's records
    python analysis/shapes_study.py suppression
    python analysis/shapes_study.py binding    # own vs other word attention per object

``generate`` appends one JSON line per image (schedule, prompt, seed, scores, detections) to
``images-w<worker>.jsonl`` in seed-major order: every schedule of a seed before the next seed, so
the study can be stopped at any time and all schedules have the same seeds (pairs); rerunning
skips (schedule, seed) blocks already recorded. Worker k takes the seeds with ``seed % workers == k``.
Every schedule generates the 40 held-out two-object prompts per seed; ``none`` also the 4
held-out one-object prompts (the gamma = 1 figures).

``analyze`` pairs every schedule with ``none`` image by image (same prompt, same seed: the same
starting noise) over the (prompt, seed) pairs both have, and reports the mean difference with a
prompt-cluster bootstrap 95% interval (:func:`taca_probe.shapes.evaluator.paired_difference`).
It also tabulates what shape each object came out with (:func:`shape_errors`).

``suppression`` records the visual->text attention mass (every layer, every step) for the baseline
and the paper's schedule on held-out prompts and tabulates it against the uniform reference
``n_txt / (n_txt + n_vis)``.

``binding`` records attention maps for the baseline and the paper's schedule on the held-out
two-object prompts and asks, per object, whether its image tokens (the object's region in the
final image, :func:`taca_probe.shapes.evaluator.object_masks`) attend to *its own* shape and colour
words more than to the other object's (:func:`word_attention`), by step, by layer and by whether
the object came out with its own shape or the other object's.
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


def shape_errors(records: list[dict]) -> dict:
    """What shape each named object came out with, from the study's records of one schedule.

    Two-object images whose prompt names two different shapes: per object, the fraction drawn with
    its own shape, the *other* object's, the third shape, or none (irregular or missing); per
    image, the fraction where the two shapes are swapped and where both objects got the same one of
    the two named shapes. One-object images: how often each shape was drawn, per prompt.
    """
    from taca_probe.shapes import dataset as ds

    objects = {"own": 0, "other": 0, "third": 0, "none": 0}
    pairs = {"n": 0, "swapped": 0, "both_one_named_shape": 0}
    one: dict[str, dict[str, int]] = {}
    for r in records:
        spec = ds.parse_prompt(r["prompt"])
        drawn = {o["colour"]: o["shape"] for o in r["objects"]}
        if spec.relation is None:
            (colour, _), = spec.objects
            counts = one.setdefault(spec.text, {})
            got = drawn.get(colour, "missing")
            counts[got] = counts.get(got, 0) + 1
            continue
        (ca, sa), (cb, sb) = spec.objects
        if sa == sb:
            continue
        da, db = drawn.get(ca), drawn.get(cb)
        for d, own, other in ((da, sa, sb), (db, sb, sa)):
            objects["own" if d == own else "other" if d == other else "third" if d in ds.SHAPES else "none"] += 1
        pairs["n"] += 1
        pairs["swapped"] += da == sb and db == sa
        pairs["both_one_named_shape"] += da == db and da in (sa, sb)
    n = sum(objects.values())
    return {"objects": n, "object_fractions": {k: round(v / n, 4) if n else None for k, v in objects.items()},
            "images": pairs["n"],
            "image_fractions": {k: round(pairs[k] / pairs["n"], 4) if pairs["n"] else None
                                for k in ("swapped", "both_one_named_shape")},
            "one_object_drawn": one}


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
    study["shape_errors"] = {spec: shape_errors(list(by.get(spec, {}).values())) for spec in SCHEDULES if spec in by}
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
        v = out["schedules"][spec] = {
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


# --------------------------------------------------------------------------------------------
# binding: does an object's region attend to its own words?
# --------------------------------------------------------------------------------------------


def word_attention(data) -> list[dict]:
    """Per (schedule, sample, object): the attention of the object's region to its own and the other words.

    ``data``: a sweep (:func:`taca_probe.open_sweep`) with ``maps`` and ``image`` on two-object
    shapes prompts. The region is the object's mask in the sample's final image (by colour),
    reduced to the latent token grid (a token belongs to it when at least half its pixels do). A
    word's attention is the map summed over every text position holding that word (CLIP and T5
    both) and averaged over the region's tokens, per recorded (step, layer). Objects whose colour
    is missing or whose region covers no whole token are left out; the shape-word pair is NaN when
    both objects have the same shape.

    Returns
    -------
    list of dict
        ``schedule``, ``sample``, ``prompt``, ``object`` (0: first named), ``named``/``drawn`` shape, and
        ``shape_own``, ``shape_other``, ``colour_own``, ``colour_other`` as (step, layer) arrays
        over :func:`taca_probe.analysis.recorded_map_steps` and the store's layers.
    """
    from taca_probe.analysis import readable_token, recorded_map_steps
    from taca_probe.shapes import dataset as ds
    from taca_probe.shapes.evaluator import detect_objects, object_masks

    steps = recorded_map_steps(data)
    gy, gx = data.sizes["y"], data.sizes["x"]
    out: list[dict] = []
    for i, spec in enumerate(data["schedule"].values.tolist()):
        run = data.isel(schedule=i).sel(step=steps)
        for s in range(run.sizes["sample"]):
            one = run.isel(sample=s)
            prompt = ds.parse_prompt(str(one["prompt"].values))
            image = one["image"].values
            masks, drawn = object_masks(image), {o.colour: o.shape for o in detect_objects(image)}
            words = [readable_token(t) for t in one["token_text"].values.tolist()]
            maps = one["maps"].transpose("step", "layer", "token", "y", "x").values.astype(np.float64)

            def word(w: str) -> np.ndarray:  # (step, layer, y, x): the map of every position of word w
                return maps[:, :, [k for k, t in enumerate(words) if t == w]].sum(2)

            for k, (colour, shape) in enumerate(prompt.objects):
                other_colour, other_shape = prompt.objects[1 - k]
                if colour not in masks:
                    continue
                m = masks[colour]
                region = m.reshape(gy, m.shape[0] // gy, gx, m.shape[1] // gx).mean((1, 3)) >= 0.5
                if not region.any():
                    continue
                mean = lambda a: a[:, :, region].mean(-1)  # noqa: E731 - (step, layer) over the region
                nan = np.full((len(steps), run.sizes["layer"]), np.nan)
                out.append({
                    "schedule": str(spec), "sample": s, "prompt": prompt.text, "object": k, "named": shape,
                    "drawn": drawn.get(colour), "other_named": other_shape,
                    "shape_own": mean(word(shape)),
                    "shape_other": nan if shape == other_shape else mean(word(other_shape)),
                    "colour_own": mean(word(colour)), "colour_other": mean(word(other_colour)),
                })
    return out


def _own(r: dict, kind: str) -> np.ndarray:
    """One object's own / (own + other) for ``kind`` (shape or colour) words, per (step, layer)."""
    return r[f"{kind}_own"] / (r[f"{kind}_own"] + r[f"{kind}_other"])


def _early_own(rows: list[dict], kind: str, early: np.ndarray) -> np.ndarray:
    """Per object: :func:`_own` over the early steps and every layer (one number each)."""
    return np.array([_own(r, kind)[early].mean() for r in rows])


def _own_fraction(rows: list[dict], kind: str, axis: int) -> list[float]:
    """Mean over objects of :func:`_own`, averaged over steps (0) or layers (1)."""
    frac = [f for f in (_own(r, kind) for r in rows) if not np.isnan(f).all()]
    return np.round(np.mean([f.mean(axis) for f in frac], 0), 4).tolist() if frac else []


def cmd_binding(args: argparse.Namespace) -> int:
    import taca_probe
    from taca_probe import open_sweep
    from taca_probe.analysis import recorded_map_steps
    from taca_probe.shapes import dataset as ds
    from taca_probe.stats import bootstrap_ci

    res = Path(args.results)
    folder = res / "binding_sweep"
    prompts = [p.text for p in ds.held_out_prompts("two")]
    mode = "resume" if (folder / "sweep.json").is_file() else "create"
    taca_probe.run_sweep(args.model, folder, prompts=prompts, seeds=args.seeds,
                         schedules=["none", "step:1.2@970"], maps="steps=" + ",".join(map(str, args.steps)), mode=mode,
                         call={"guidance_scale": args.guidance}, device="cpu")
    data = open_sweep(folder)
    rows = word_attention(data)
    steps = recorded_map_steps(data)
    timestep = data["timestep"].isel({d: 0 for d in ("schedule", "sample") if d in data["timestep"].dims})
    out: dict = {"prompts": len(prompts), "seeds": args.seeds, "map_steps": steps,
                 "timesteps": np.round(timestep.sel(step=steps).values, 1).tolist(),
                 "layers": [str(x) for x in data["layer"].values.tolist()], "schedules": {}}
    # At the steps where the paper's rule acts (t >= 970): per-object own fractions with prompt-cluster
    # intervals, and TACA minus baseline paired by (sample, object) (same prompt and seed).
    early = np.array(out["timesteps"]) >= 970
    base = {(r["sample"], r["object"]): r for r in rows if r["schedule"] == "none" and r["named"] != r["other_named"]}
    for spec in map(str, data["schedule"].values.tolist()):
        mine = [r for r in rows if r["schedule"] == spec]
        diff = [r for r in mine if r["named"] != r["other_named"]]
        groups = {"all": diff, "drawn_own_shape": [r for r in diff if r["drawn"] == r["named"]],
                  "drawn_other_shape": [r for r in diff if r["drawn"] == r["other_named"]]}
        v = out["schedules"][spec] = {
            "objects": len(mine), "different_shape_objects": len(diff),
            "shape_own_fraction": {g: {"n": len(grp), "by_step": _own_fraction(grp, "shape", 1),
                                       "by_layer": _own_fraction(grp, "shape", 0)} for g, grp in groups.items()},
            "colour_own_fraction": {"by_step": _own_fraction(mine, "colour", 1),
                                    "by_layer": _own_fraction(mine, "colour", 0)},
            # How much of the region's attention the two shape words get (not a fraction): what TACA scales.
            "shape_words_mass_by_step": np.round(
                np.mean([(r["shape_own"] + r["shape_other"]).mean(1) for r in diff], 0), 5).tolist(),
            "early_steps": {},
        }
        for kind in ("shape", "colour"):
            ci = bootstrap_ci(_early_own(diff, kind, early), clusters=[r["prompt"] for r in diff])
            v["early_steps"][f"{kind}_own_fraction"] = np.round(ci, 4).tolist()
            if spec != "none":
                both = [r for r in diff if (r["sample"], r["object"]) in base]
                paired = [base[(r["sample"], r["object"])] for r in both]
                d = _early_own(both, kind, early) - _early_own(paired, kind, early)
                v["early_steps"][f"{kind}_own_fraction_minus_none"] = np.round(
                    bootstrap_ci(d, clusters=[r["prompt"] for r in both]), 4).tolist()
    (res / "binding.json").write_text(json.dumps(out, indent=1) + "\n")
    for spec, v in out["schedules"].items():
        print(spec, "own shape-word fraction by step:", v["shape_own_fraction"]["all"]["by_step"])
        print(spec, "own colour-word fraction by step:", v["colour_own_fraction"]["by_step"])
        print(spec, "at t >= 970 (mean, 95% interval):", v["early_steps"])
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
    b = sub.add_parser("binding")
    b.add_argument("--seeds", type=int_ranges, default=[0, 1, 2, 3], help="e.g. 0-3 (default)")
    b.add_argument("--steps", type=int_ranges, default=[0, 1, 2, 3, 6, 12, 18, 24],
                   help="denoising steps whose maps are recorded (default 0-3,6,12,18,24)")
    b.add_argument("--guidance", type=float, default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    return {"cfg": cmd_cfg, "generate": cmd_generate, "analyze": cmd_analyze, "suppression": cmd_suppression,
            "binding": cmd_binding}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
