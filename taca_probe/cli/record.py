"""``generate``, ``record``, ``sweep``, ``info`` and ``export-images``: thin commands over the runner."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import diffusers
import torch
import transformers
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__
from ..capture import image_bytes
from ..distributed import ranks_from_env
from ..errors import TacaProbeError
from ..intervention import taca
from ..models import call_settings, load_pipeline, resolve_device, resolve_dtype
from ..rendering import complete_runs, open_inputs
from ..runner import Target, call_as_run, record_plan
from ..schedules import parse
from ..selection import MapSelection
from ..store import COORD_ORDER, VARIABLE_ORDER, StoreError, check_removable, is_store, open_run, store_info
from ..stats import sample_keys
from ..sweep import DEFAULT_GAMMA0, DEFAULT_T_THRESH, MANIFEST, SweepError, is_sweep, open_sweep, read_manifest, \
    run_sweep, sample_plan, sweep_schedules
from .args import EMBEDDED_NOTE, MAX_IMAGE_SIDE, check_json, check_out, floats, json_args, lora_args, model_args, \
    path_arg, read_prompts, recording_args, refuse_to_replace, sampling_args, schedule_help, short_prompt, write_json


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", parents=[model_args(), sampling_args(), lora_args()],
                         help="generate images with a TACA schedule; PNG + JSON sidecar each",
                         description="Generate images with a TACA schedule. " + EMBEDDED_NOTE)
    gen.add_argument("--schedule", default="step:1.2@970", help=schedule_help("step:1.2@970"))
    gen.add_argument("--out", type=path_arg, default="out", help="output folder (default ./out)")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace images and sidecars of the same name that --out already holds")
    gen.set_defaults(func=cmd_generate)

    rec = sub.add_parser(
        "record", parents=[model_args(), sampling_args(), lora_args(), recording_args("store")],
        help="sample prompts x seeds and record cross-modal attention into a zarr store",
        description="Sample every prompt once per seed and record, per layer, step and head, the "
        "visual->text and text->visual attention mass (and optional per-token maps) into a zarr store "
        "that opens with taca_probe.open_run as an xarray Dataset. " + EMBEDDED_NOTE)
    rec.add_argument("--schedule", default="none", help="TACA schedule while recording: " + schedule_help("none"))
    rec.add_argument("--out", type=path_arg, default="run.zarr", help="store folder (default ./run.zarr)")
    rec.set_defaults(func=cmd_record)

    sw = sub.add_parser(
        "sweep", parents=[model_args(), sampling_args(), lora_args(), recording_args("sweep")],
        help="record a grid of TACA schedules over the same prompts and seeds (one store per schedule)",
        description="Record every prompt x seed under each schedule of a grid (step:G@T for every gamma0 G "
        "and t_thresh T, plus any --schedule), one store per schedule in the --out folder with a sweep.json "
        "manifest and every image as PNG; taca_probe.open_sweep(OUT) opens it as one Dataset with a "
        "'schedule' dimension, and `taca-probe figures OUT` draws it. " + EMBEDDED_NOTE)
    sw.add_argument("--gamma0", type=floats, default=list(DEFAULT_GAMMA0), metavar="G[,G...]",
                    help="gamma0 values of the grid (default %s; 1.0 is the stock model, recorded once as "
                    "'none')" % ",".join(f"{g:g}" for g in DEFAULT_GAMMA0))
    sw.add_argument("--t-thresh", type=floats, default=list(DEFAULT_T_THRESH), metavar="T[,T...]",
                    help="threshold timesteps of the grid, 0..1000 (default %s, the paper's)"
                    % ",".join(f"{t:g}" for t in DEFAULT_T_THRESH))
    sw.add_argument("--schedule", action="append", dest="schedules", metavar="SPEC",
                    help="an extra schedule of any form (repeatable), e.g. first:1.2@3, beside the grid: "
                    + schedule_help(None))
    sw.add_argument("--no-grid", action="store_true",
                    help="record only the --schedule specs, no grid: the stock-model baseline 'none' is recorded "
                    "only if given (--schedule none)")
    sw.add_argument("--out", type=path_arg, default="sweep", help="sweep folder (default ./sweep)")
    sw.set_defaults(func=cmd_sweep)

    info = sub.add_parser("info", parents=[json_args("the store's description")],
                          help="schema, sizes and provenance of a store")
    info.add_argument("store", type=path_arg, help="store folder")
    info.set_defaults(func=cmd_info)

    ex = sub.add_parser("export-images", help="write a store's (or sweep's) images as PNG files, named by prompt and seed",
                        description="Write every complete sample's image as DIR/NNNN_<prompt>_seed<S>.png (a sweep: "
                        "one subfolder per schedule).")
    ex.add_argument("store", type=path_arg, help="store folder or sweep folder")
    ex.add_argument("--out", type=path_arg, required=True, help="output folder")
    ex.add_argument("--overwrite", action="store_true", help="replace images of the same name that --out already holds")
    ex.set_defaults(func=cmd_export_images)


def _check_size(pipe, height: int | None, width: int | None) -> None:
    # VAE downsampling x patch size (SD3; FLUX packs 2x2 latents)
    patch = int(getattr(pipe.transformer.config, "patch_size", 2) or 2)
    multiple = int(getattr(pipe, "vae_scale_factor", 8)) * max(2, patch)
    # SD3 learned position tables cover pos_embed_max_size tokens a side; FLUX has no table, a memory cap
    max_tokens = getattr(pipe.transformer.config, "pos_embed_max_size", None)
    largest = int(max_tokens) * multiple if max_tokens else MAX_IMAGE_SIDE
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % multiple:
            raise TacaProbeError(f"--{name} {value} is not a multiple of {multiple}, which this model needs")
        if value is not None and value > largest:
            raise TacaProbeError(f"--{name} {value} is larger than this model supports ({largest} pixels)")


def _load(args: argparse.Namespace, device: torch.device | None = None):
    """The pipeline of ``--model`` on ``--device``/``--dtype``, without per-sample progress bars,
    and the call settings of ``--steps``, ``--height`` ... over the model's recommended ones."""
    device = device or resolve_device(args.device)
    pipe = load_pipeline(args.model, device=str(device), dtype=resolve_dtype(args.dtype, device))
    pipe.set_progress_bar_config(disable=True)  # one bar over the samples, not one per sample inside it
    call = call_settings(pipe, {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
                                "guidance_scale": args.guidance, "max_sequence_length": args.max_sequence_length},
                         model=args.model)
    _check_size(pipe, call["height"], call["width"])
    return pipe, call


def _mass_lines(ds, label_width: int, by_schedule: bool) -> list[str]:
    """Mean visual->text mass by (schedule,) block type at the first and last step."""
    mass = ds["vis_txt_mass"].sel(branch="cond") if "branch" in ds["vis_txt_mass"].dims else ds["vis_txt_mass"]
    t, last = ds["timestep"].isel(sample=0).values, ds.sizes["step"] - 1
    uniform = ds.attrs["n_txt"] / (ds.attrs["n_txt"] + ds.attrs["n_vis"])
    name = max([24] + [len(str(s)) for s in ds["schedule"].values]) if by_schedule else 0  # long specs stay aligned
    head = f"{'schedule':<{name}} " if by_schedule else ""
    layers = "" if by_schedule else f" {'layers':>6}"
    steps = sorted({0, last})  # one column when there is one step
    lines = [f"mean visual->text attention mass (uniform attention would give {uniform:.4f}):",
             f"  {head}{'block type':<10}{layers}" + "".join(f" {'step %d (t=%.0f)' % (s, t[s]):>{label_width}}"
                                                            for s in steps)]
    for spec in ds["schedule"].values if by_schedule else [None]:
        m_spec = mass.sel(schedule=spec) if by_schedule else mass
        for bt in sorted(set(ds["block_type"].values.tolist())):
            sel = m_spec.where(ds["block_type"] == bt, drop=True)
            m = sel.mean(("sample", "layer", "head"))
            row = f"{str(spec):<{name}} {bt:<10}" if by_schedule else f"{bt:<10} {sel.sizes['layer']:>6}"
            lines.append(f"  {row}" + "".join(f" {float(m.isel(step=s)):>{label_width}.4f}" for s in steps))
    return lines


def _summary(path: Path) -> str:
    """One screen: mean visual->text mass by block type at the first and last step."""
    ds = open_run(path)
    if ds.sizes["sample"] == 0:
        return "(no complete sample)"
    lines = [f"{ds.sizes['sample']} sample(s), {ds.sizes['step']} step(s), {ds.sizes['layer']} attention layers, "
             f"{ds.attrs.get('n_txt')} text + {ds.attrs.get('n_vis')} image tokens; schedule {ds.attrs.get('schedule')}"]
    lines += _mass_lines(ds, 18, by_schedule=False)
    if ds.attrs.get("schedule") not in (None, "none"):
        cond = ds.sel(branch="cond") if "branch" in ds.dims else ds
        r = float(cond["vis_txt_mass"].isel(step=0).mean()) / float(cond["vis_txt_mass_ref"].isel(step=0).mean())
        lines.append(f"  TACA amplification at step 0 (applied / gamma=1 mass): {r:.3f}x")
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> int:
    schedule = parse(args.schedule)  # validate before loading anything
    items = read_prompts(args)
    out = Path(args.out)
    check_out(out)
    plan = sample_plan(items, args.seeds)  # each (prompt, seed) once, as in a sweep
    stems = [f"{index:04d}-seed{seed}" for index, (_, seed) in enumerate(plan)]
    refuse_to_replace(out, [out / f"{stem}.{ext}" for stem in stems for ext in ("png", "json")], args.overwrite, "run")
    pipe, call = _load(args)
    versions = {"taca_probe": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__}
    # the bar starts once TACA (and a LoRA) is installed, so that a refusal stays one line
    with taca(pipe, schedule, lora=args.lora, lora_scale=args.lora_scale) as handle, \
            tqdm(total=len(plan), desc="images", unit="image", file=sys.stderr) as bar:
        for stem, (prompt, seed) in zip(stems, plan):
            handle.calls.clear()
            bar.set_postfix_str(f"seed {seed}: {short_prompt(prompt)}")
            t0 = time.perf_counter()
            out_np = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call)
            image = Image.fromarray(image_bytes(out_np.images, prompt, seed)[0])  # NaN: refused, not saved
            elapsed = time.perf_counter() - t0
            out.mkdir(parents=True, exist_ok=True)  # here: an image refused first leaves no folder
            image.save(out / f"{stem}.png")
            sidecar = {
                "prompt": prompt, "seed": seed, "steps": call["num_inference_steps"],
                "height": image.height, "width": image.width, "guidance": call_as_run(pipe, call)["guidance_scale"],
                "pipeline_kwargs": call, "schedule": schedule.spec, "schedule_description": schedule.describe(),
                "steps_with_gamma": handle.steps_active,
                "lora": None if args.lora is None else str(args.lora), "lora_scale": args.lora_scale,
                "model": args.model, "pipeline": type(pipe).__name__, "transformer": type(pipe.transformer).__name__,
                "device": str(pipe.device), "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
                "generator": "torch.Generator('cpu').manual_seed(seed)", "seconds": round(elapsed, 3),
                "versions": versions, "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            }
            (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
            bar.update(1)
    print(f"wrote {len(plan)} image(s) with JSON sidecars to {out}/")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    schedule = parse(args.schedule)  # validate cheap things before loading a model
    maps = MapSelection.parse(args.maps)
    items = read_prompts(args)
    out = Path(args.out)
    check_out(out, store=True)
    ranks = ranks_from_env()
    # Under torchrun, rank 0 creates the store while the others may still be starting: only it checks.
    if out.exists() and not (args.resume or args.overwrite) and ranks.is_main:
        raise StoreError(f"{str(out)!r} already exists; pass --resume to complete it or --overwrite to replace it")
    if out.exists() and not is_store(out):
        raise StoreError(f"{str(out)!r} exists and is not a taca-probe store; choose another --out")
    if args.overwrite and ranks.is_main:
        check_removable(out)
    if args.resume and not out.exists():
        raise StoreError(f"--resume: no store at {str(out)!r} (a run stopped before its first sample leaves none); "
                         "run without --resume")
    pipe, call = _load(args, ranks.device(resolve_device(args.device)))
    plan = sample_plan(items, args.seeds)  # each (prompt, seed) once, as in a sweep: a repeat would count twice
    mode = "resume" if args.resume or not ranks.is_main else "overwrite" if args.overwrite else "create"
    todo = record_plan(pipe, [Target(schedule.spec, out)], plan, call, maps=maps, branch=args.branch, mode=mode,
                       lora=args.lora, lora_scale=args.lora_scale, model=args.model)[0]
    if ranks.is_main:
        print(f"store: {out}  ({todo} recorded now by {ranks.world} process(es), {len(plan) - todo} already complete)")
        print(_summary(out))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    extra = [parse(s).spec for s in (args.schedules or [])]  # validate cheap things before loading a model
    if args.no_grid and not extra:
        raise TacaProbeError("--no-grid needs at least one --schedule SPEC")
    for t in [] if args.no_grid else args.t_thresh:
        if not 0 <= t <= 1000:
            raise TacaProbeError(f"--t-thresh {t:g} is not a timestep in 0..1000")
    specs = sweep_schedules(gamma0=[] if args.no_grid else args.gamma0,
                            t_thresh=[] if args.no_grid else args.t_thresh, extra=extra)
    maps = MapSelection.parse(args.maps)
    items = read_prompts(args)
    out = Path(args.out)
    check_out(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"{str(out)!r} is a file; choose another --out")
    # Under torchrun, rank 0 lays the sweep out while the others may still be starting: only it checks.
    main_rank = ranks_from_env().is_main
    non_empty = out.exists() and any(out.iterdir()) and main_rank
    if non_empty and not (args.resume or args.overwrite):
        raise SweepError(f"{str(out)!r} already exists; pass --resume to complete it or --overwrite to replace it")
    if args.resume and not is_sweep(out):
        raise SweepError(f"--resume: no sweep at {str(out)!r} (no {MANIFEST})")
    if args.overwrite and non_empty and not is_sweep(out):
        raise SweepError(f"refusing to overwrite {str(out)!r}: it is not a sweep folder (no {MANIFEST})")
    pipe, call = _load(args)
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "create"
    folder = run_sweep(pipe, out, prompts=items, schedules=specs, maps=maps, branch=args.branch, mode=mode,
                       call=call, lora=args.lora, lora_scale=args.lora_scale, model_name=args.model)
    if not main_rank:  # the summary is rank 0's, once the sweep is complete
        return 0
    doc = read_manifest(folder)
    print(f"sweep: {folder}  ({len(doc['schedules'])} schedules x {len(doc['plan'])} samples; "
          f"{', '.join(f'{k}={v}' for k, v in doc['call'].items())})")
    name = max([24] + [len(entry["spec"]) for entry in doc["schedules"]])
    for entry in doc["schedules"]:
        print(f"  {entry['spec']:<{name}} {entry['samples_complete']:>4} samples  {entry['store']}  {entry['images']}/")
    ds = open_sweep(folder)
    print("(no sample complete in every schedule)" if ds.sizes.get("sample", 0) == 0
          else "\n".join(_mass_lines(ds, 16, by_schedule=True)))
    print(f"open it with taca_probe.open_sweep({str(folder)!r}); draw it with: taca-probe figures {folder} "
          f"--out {folder / 'figures'}")
    return 0


def format_info(info: dict) -> str:
    """``taca-probe info``: data variables, coordinates and internal arrays in aligned tables."""
    internal = ("complete", "chunk_manifest")  # bookkeeping that open_run hides
    coords = [n for n in info["arrays"] if n not in VARIABLE_ORDER and n not in internal]
    groups = {"data variables": [n for n in VARIABLE_ORDER if n in info["arrays"]],
              "coordinates": sorted(coords, key=lambda n: (COORD_ORDER.index(n) if n in COORD_ORDER else len(COORD_ORDER), n)),
              "internal (open_run hides them)": [n for n in internal if n in info["arrays"]]}
    rows = {}
    for name, a in info["arrays"].items():
        dtype = "string" if "StringDType" in a["dtype"] or a["dtype"].startswith(("<U", "|S", "object")) else a["dtype"]
        rows[name] = (name, dtype, "(" + ", ".join(f"{d}={n}" for d, n in zip(a["dims"], a["shape"])) + ")",
                      "chunks " + "x".join(map(str, a["chunks"])), f"{a['stored_bytes'] / 1024:.1f} KiB")
    widths = [max(len(r[i]) for r in rows.values()) for i in range(4)] if rows else [0] * 4
    lines = [f"{info['path']}: taca-probe store, schema {info['schema']}",
             f"samples: {info['samples_complete']} complete, {info['samples_incomplete']} incomplete; "
             f"{info['stored_bytes'] / 2**20:.2f} MiB on disk"]
    if info.get("samples_damaged"):
        first = next(iter(info["samples_damaged"].values()))[0]
        lines.append(f"DAMAGED: {len(info['samples_damaged'])} complete sample(s) "
                     f"({', '.join(map(str, info['samples_damaged']))}); first: {first}; "
                     "`taca-probe record ... --resume` records them again")
    if info.get("unfinished_writes"):
        lines.append(f"{len(info['unfinished_writes'])} unfinished write(s) (*.partial: under way, or left by a killed "
                     f"process), not counted above: {info['unfinished_writes'][0]}"
                     + (" ..." if len(info["unfinished_writes"]) > 1 else ""))
    for title, names in groups.items():
        if names:
            lines.append(f"{title}:")
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(rows[n][:4], widths)) + "  " + rows[n][4].rjust(10)
                      for n in names]
    lines.append("provenance:")
    key = max((len(k) for k in info["attrs"]), default=0)
    lines += [f"  {k:<{key}}  {v}" for k, v in info["attrs"].items()]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    check_json(args.json)
    if is_sweep(args.store):  # the README's quick start makes one: say what to give instead
        stores = [e["store"] for e in read_manifest(args.store)["schedules"]]
        raise SweepError(f"{args.store!r} is a sweep folder, not a store; give one of its stores: "
                         + ", ".join(str(Path(args.store) / s) for s in stores))
    info = store_info(args.store)
    if args.json:  # strict JSON: a NaN or inf attribute (older stores) is written as a string ("nan", "inf")
        strict = json.loads(json.dumps(info, default=str), parse_constant=lambda c: str(float(c)))
        write_json(args.json, json.dumps(strict, indent=2, allow_nan=False))
    else:
        print(format_info(info))
    return 0


def _slug(text: str, width: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:width].rstrip("-") or "prompt"


def cmd_export_images(args: argparse.Namespace) -> int:
    """Every image of a store (or each store of a sweep) as PNG, named by prompt and seed."""
    out = Path(args.out)
    check_out(out)
    src = Path(args.store)
    runs = open_inputs([src], None, as_sweep=False)[0]  # a sweep: each schedule's own complete samples
    number = {r.label: k for k, r in enumerate(runs)}  # a schedule left out keeps the others' folder names
    todo = []
    for label, spec, ds, _ in complete_runs(runs, "not exported", StoreError):
        # a sweep: one folder per schedule, numbered in order (two specs can share a slug); a store: --out
        folder = out / f"{number[label]:02d}_{_slug(spec, 40)}" if len(runs) > 1 or src != Path(label) else out
        for i, (prompt, seed, b) in enumerate(sample_keys(ds)):
            todo.append((folder / (f"{i:04d}_{_slug(prompt)}_seed{seed}" + (f"_{b}" if b else "") + ".png"), ds, i))
    refuse_to_replace(out, [path for path, *_ in todo], args.overwrite, "export")  # of another store, say
    for path, ds, i in todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds["image"].isel(sample=i).values).save(path)
    print(f"wrote {len(todo)} PNG image(s) to {out}/")
    return 0
