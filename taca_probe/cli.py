"""The ``taca-probe`` command line.

Every error that bad input causes ends in one line on stderr and exit status 2; no traceback
(set ``TACA_PROBE_DEBUG=1`` to see one for an unexpected internal error).
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
import time
from pathlib import Path
from typing import Sequence

from . import __version__
from .selection import MAX_INT, int_ranges
from .errors import TacaProbeError

EMBEDDED_NOTE = (
    "The default model, shapes, is a tiny SD3 trained on coloured shapes and shipped in the package; the other "
    "embedded models (tiny-sd3, tiny-sd35, tiny-flux) have RANDOM weights: they exercise the machinery, not the "
    "science."
)


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


def _seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-3`` or a mix -> list of ints."""
    try:
        return int_ranges(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"bad seeds {text!r}: {e}; seeds are integers 0..{MAX_INT}, e.g. 0,1,2 or 0-7") from None


def short_prompt(prompt: str, width: int = 40) -> str:
    """A prompt for a progress bar: cut at a word, never inside one."""
    return textwrap.shorten(" ".join(prompt.split()), width, placeholder=" …")


def _bounded(lo: float, hi: float, *, integer: bool):
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


def _bounded_int(lo: int, hi: int):
    return _bounded(lo, hi, integer=True)


def _bounded_float(lo: float, hi: float):
    return _bounded(lo, hi, integer=False)


_positive_int = _bounded_int(1, MAX_INT)


#: Largest image side accepted before a model loads (SD3 models then check their own position table).
MAX_IMAGE_SIDE = 4096
#: More denoising steps than a scheduler has training timesteps is a typo.
MAX_STEPS = 1000
_steps = _bounded_int(1, MAX_STEPS)
_image_side = _bounded_int(16, MAX_IMAGE_SIDE)
_guidance = _bounded_float(0.0, 100.0)
_lora_scale = _bounded_float(-100.0, 100.0)


def _check_out(path: Path) -> None:
    """Refuse an output path under a file or in a folder that cannot be written, before loading a model."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise TacaProbeError(f"--out {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TacaProbeError(f"--out {str(path)!r}: cannot write in {str(parent)!r} (permission denied or read-only)")


def _seed_value(value: object, where: str) -> int:
    """A seed from a JSON prompts file: an integer in 0..MAX_INT (not a bool, not 1.7)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise TacaProbeError(f"{where}: seed {value!r} is not an integer in 0..{MAX_INT}")
    return value


def _read_prompts(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """(prompt, seeds) pairs from --prompt and --prompts FILE (text: one a line; JSONL: prompt, seed)."""
    for p in args.prompt or []:
        if not p.strip():
            raise TacaProbeError("--prompt: a prompt must be non-empty text")
    items: list[tuple[str, list[int]]] = [(p, args.seeds) for p in (args.prompt or [])]
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise TacaProbeError(f"prompt file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TacaProbeError(f"prompt file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
        # lines end at "\n" only: str.splitlines would also split at U+2028 and other separators
        for n, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                    prompt = rec["prompt"]
                except (ValueError, KeyError, TypeError):
                    raise TacaProbeError(f"{path}:{n}: expected a JSON object with 'prompt' (and optional 'seed')") from None
                if not isinstance(prompt, str) or not prompt.strip():
                    raise TacaProbeError(f"{path}:{n}: 'prompt' must be non-empty text, got {prompt!r}")
                seeds = [_seed_value(rec["seed"], f"{path}:{n}")] if "seed" in rec else args.seeds
                items.append((prompt, seeds))
            else:
                items.append((line, args.seeds))
    if not items:
        raise TacaProbeError("no prompt given: use --prompt TEXT (repeatable) or --prompts FILE")
    return items


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL, EMBEDDED_MODELS

    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded name ({', '.join(EMBEDDED_MODELS)}), a local diffusers folder, or a hub id already in "
        f"the local Hugging Face cache (default: {DEFAULT_MODEL}, the trained shapes model)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line, or JSONL with 'prompt' and 'seed'")
    p.add_argument("--seeds", type=_seeds, default=[0], help="seeds for every prompt, e.g. 0,1,2 or 0-7 (default 0)")
    p.add_argument("--steps", type=_steps, default=None,
                   help="denoising steps (default: the model's recommended, else 28)")
    p.add_argument("--height", type=_image_side, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=_image_side, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--guidance", type=_guidance, default=None, help="guidance scale (default: the model's or pipeline's)")
    p.add_argument("--max-sequence-length", type=_bounded_int(1, 512), default=None, metavar="N",
                   help="T5 text length (default: the model's recommended, else the pipeline's)")


def _call_kwargs(args: argparse.Namespace, pipe) -> dict:
    """Pipeline call settings: explicit flags, else the model's recommended ones, else defaults.

    Always returns ``num_inference_steps``, ``height`` and ``width`` (so that stores and sidecars
    record what was used); ``guidance_scale`` and ``max_sequence_length`` when known.
    """
    from .models import model_call_defaults

    call = dict(model_call_defaults(args.model))
    explicit = {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
                "guidance_scale": args.guidance, "max_sequence_length": args.max_sequence_length}
    call.update({k: v for k, v in explicit.items() if v is not None})
    call.setdefault("num_inference_steps", 28)
    default_h, default_w = _default_size(pipe)
    call.setdefault("height", default_h)
    call.setdefault("width", default_w)
    _check_size(pipe, call["height"], call["width"])
    return call


def _schedule_help(default: str | None) -> str:
    """The --schedule help: its default (stated once, by the caller's parser) and the forms."""
    from .schedules import FORMS

    when = {None: "no default", "none": "default none: the stock model",
            "step:1.2@970": "default step:1.2@970, the paper's rule"}.get(default, f"default {default}")
    return f"gamma schedule ({when}; 'none' = stock model). Forms: " + " | ".join(
        line.strip() for line in FORMS.strip().splitlines() if line.strip()
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taca-probe",
        description="TACA (temperature-adjusted cross-modal attention) and attention probes for MM-DiT "
        "diffusion transformers (SD3, SD3.5, FLUX.1) in diffusers. " + EMBEDDED_NOTE,
    )
    parser.add_argument("--version", action="version", version=f"taca-probe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate images with a TACA schedule; PNG + JSON sidecar each",
                         description="Generate images with a TACA schedule. " + EMBEDDED_NOTE)
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--schedule", default="step:1.2@970", help=_schedule_help("step:1.2@970"))
    gen.add_argument("--lora", default=None, help="LoRA (path or loaded adapter name) active exactly where gamma != 1")
    gen.add_argument("--lora-scale", type=_lora_scale, default=1.0, help="LoRA weight while active (default 1)")
    gen.add_argument("--out", default="out", help="output folder (default ./out)")
    gen.set_defaults(func=cmd_generate)

    rec = sub.add_parser(
        "record",
        help="sample prompts x seeds and record cross-modal attention into a zarr store",
        description="Sample every prompt once per seed and record, per layer, step and head, the "
        "visual->text and text->visual attention mass (and optional per-token maps) into a zarr store "
        "that opens with taca_probe.open_run as an xarray Dataset. " + EMBEDDED_NOTE,
    )
    _add_model_args(rec)
    _add_sampling_args(rec)
    rec.add_argument("--schedule", default="none", help="TACA schedule while recording: " + _schedule_help("none"))
    rec.add_argument("--maps", default=None, metavar="SPEC",
                     help="also record per-token attention maps for a selection, e.g. 'steps=0-4;layers=all;"
                     "tokens=prompt' (default: no maps)")
    rec.add_argument("--branch", default="cond", choices=["cond", "uncond", "both"],
                     help="CFG branch to record (default cond; both adds a branch dimension)")
    rec.add_argument("--lora", default=None, help="LoRA (path or loaded adapter name) active exactly where gamma != 1")
    rec.add_argument("--lora-scale", type=_lora_scale, default=1.0, help="LoRA weight while active (default 1)")
    rec.add_argument("--out", default="run.zarr", help="store folder (default ./run.zarr)")
    group = rec.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="complete an existing store (same settings)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing store")
    rec.set_defaults(func=cmd_record)

    from .shapes.benchmark import add_eval_parser

    add_eval_parser(sub)  # taca-probe eval: the shapes model's exact compositional benchmark

    info = sub.add_parser("info", help="schema, sizes and provenance of a store")
    info.add_argument("store", help="store folder")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    ex = sub.add_parser("export-images", help="write a store's (or sweep's) images as PNG files, named by prompt and seed",
                        description="Write every complete sample's image as DIR/NNNN_<prompt>_seed<S>.png (a sweep: "
                        "one subfolder per schedule).")
    ex.add_argument("store", help="store folder or sweep folder")
    ex.add_argument("--out", required=True, help="output folder")
    ex.set_defaults(func=cmd_export_images)

    _add_sweep_parser(sub)
    _add_figures_parser(sub)
    _add_report_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks (not tests): the cost of TACA against stock attention")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=_Parser)
    ba = bsub.add_parser("attention", help="time stock SDPA, TACA, the naive materialized path and eager flex",
                         description="Interleaved timings, median of N, ratio to stock SDPA, peak extra memory.")
    ba.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ba.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu)")
    ba.add_argument("--shape", action="append", metavar="B,H,NTXT,NVIS,D[,ORDER]",
                    help="a shape to time (repeatable; ORDER txt-first (default) or img-first); default: the "
                    "FLUX 1024px shape 1,24,512,4096,128 and the SD3.5 shape 2,24,333,4096,64,img-first")
    ba.add_argument("--heads", type=_positive_int, default=None, help="override the head count of every shape")
    ba.add_argument("--gamma", type=float, default=1.2, help="gamma of the TACA variants (default 1.2)")
    ba.add_argument("--repeats", type=_positive_int, default=7, help="timed repeats per variant (default 7)")
    ba.add_argument("--threads", type=_positive_int, default=1, help="CPU threads (default 1: steadier timings)")
    ba.add_argument("--variants", default="sdpa,taca,taca+masses,naive,flex",
                    help="comma list of sdpa, taca, taca+masses (the device's default statistics path), "
                    "taca+masses:triton, taca+masses:fused, taca+masses:block, taca+maps, naive, flex, flex-compiled")
    ba.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ba.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-' for stdout only)")
    ba.set_defaults(func=cmd_bench_attention)
    be = bsub.add_parser("e2e", help="time whole sampling runs with and without the probe",
                         description="A random-weight SD3 transformer of a real width (text encoders and VAE "
                         "stay tiny) samples with CFG, interleaved with and without recording; median of N.")
    be.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    be.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu)")
    be.add_argument("--width", default="sd35-medium",
                    help="transformer width preset: sd35-medium (default, 24 x 64), sd3-medium, sd35-large, flux-dev")
    be.add_argument("--layers", type=_positive_int, default=2, help="transformer blocks at reduced depth (default 2)")
    be.add_argument("--depth", choices=("reduced", "full"), default="reduced",
                    help="full: the published depth (FLUX.1-dev 19 + 38 blocks, SD3.5-Large 38), weights made on "
                    "the device; reduced (default): --layers blocks")
    be.add_argument("--compile", choices=("whole", "regional"), default=None,
                    help="time compiled stock against compiled with the probe: torch.compile(transformer), or "
                    "diffusers' compile_repeated_blocks(fullgraph=True) (FLUX)")
    be.add_argument("--image-tokens", type=_positive_int, default=1024, help="image tokens, a square (default 1024)")
    be.add_argument("--steps", type=_positive_int, default=4, help="denoising steps per sample (default 4)")
    be.add_argument("--repeats", type=_positive_int, default=5, help="timed samples per variant (default 5)")
    be.add_argument("--schedule", default="none", help="TACA schedule in both variants (default none)")
    be.add_argument("--maps", default=None,
                    help="also time the probe with these maps (e.g. 'steps=0-4;tokens=0-19'; default: masses only)")
    be.add_argument("--threads", type=_positive_int, default=1, help="CPU threads (default 1)")
    be.add_argument("--json", metavar="PATH", help="also write the result as JSON ('-' for stdout only)")
    be.set_defaults(func=cmd_bench_e2e)
    bench.set_defaults(func=lambda args: (_ for _ in ()).throw(TacaProbeError("bench: choose a benchmark: attention, e2e")))
    return parser


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------


def _check_size(pipe, height: int | None, width: int | None) -> None:
    # VAE downsampling x patch size (SD3; FLUX packs 2x2 latents)
    patch = int(getattr(pipe.transformer.config, "patch_size", 2) or 2)
    multiple = int(getattr(pipe, "vae_scale_factor", 8)) * max(2, patch)
    # SD3 learned position tables cover pos_embed_max_size tokens a side.
    max_tokens = getattr(pipe.transformer.config, "pos_embed_max_size", None)
    largest = int(max_tokens) * multiple if max_tokens else MAX_IMAGE_SIDE  # FLUX: no table, a memory cap
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % multiple:
            raise TacaProbeError(f"--{name} {value} is not a multiple of {multiple}, which this model needs")
        if value is not None and largest is not None and value > largest:
            raise TacaProbeError(f"--{name} {value} is larger than this model supports ({largest} pixels)")


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"taca_probe": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def cmd_generate(args: argparse.Namespace) -> int:
    from .schedules import parse

    schedule = parse(args.schedule)  # validate before loading anything
    items = _read_prompts(args)
    _check_out(Path(args.out))
    import torch
    from tqdm.auto import tqdm

    from .intervention import taca
    from .models import load_pipeline, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, device=str(device), dtype=dtype)
    call = _call_kwargs(args, pipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = _versions()
    n_total = sum(len(seeds) for _, seeds in items)
    index = 0
    pipe.set_progress_bar_config(disable=True)  # one bar over the images, not one per image inside it
    # the bar starts once TACA (and a LoRA) is installed, so that a refusal stays one line
    with taca(pipe, schedule, lora=args.lora, lora_scale=args.lora_scale) as handle, \
            tqdm(total=n_total, desc="images", unit="image", file=sys.stderr) as bar:
        for prompt, seeds in items:
            for seed in seeds:
                handle.calls.clear()
                kwargs = {**call, "generator": torch.Generator("cpu").manual_seed(seed)}
                bar.set_postfix_str(f"seed {seed}: {short_prompt(prompt)}")
                t0 = time.perf_counter()
                image = pipe(prompt, **kwargs).images[0]
                elapsed = time.perf_counter() - t0
                stem = f"{index:04d}-seed{seed}"
                image.save(out / f"{stem}.png")
                sidecar = {
                    "prompt": prompt, "seed": seed, "steps": call["num_inference_steps"],
                    "height": image.height, "width": image.width,
                    "guidance": call.get("guidance_scale"), "pipeline_kwargs": call, "schedule": schedule.spec, "schedule_description": schedule.describe(),
                    "steps_with_gamma": handle.steps_active,
                    "lora": None if args.lora is None else str(args.lora), "lora_scale": args.lora_scale,
                    "model": args.model, "pipeline": type(pipe).__name__,
                    "transformer": type(pipe.transformer).__name__,
                    "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                    "generator": "torch.Generator('cpu').manual_seed(seed)",
                    "seconds": round(elapsed, 3), "versions": versions,
                    "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                }
                (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
                index += 1
                bar.update(1)
    print(f"wrote {index} image(s) with JSON sidecars to {out}/")
    return 0


# ------------------------------------------------------------------------------------------------
# record / info
# ------------------------------------------------------------------------------------------------


def _default_size(pipe) -> tuple[int, int]:
    size = int(getattr(pipe, "default_sample_size", 128)) * int(getattr(pipe, "vae_scale_factor", 8))
    return size, size


def cmd_record(args: argparse.Namespace) -> int:
    from .recording import MapSelection
    from .schedules import parse
    from .store import StoreError, is_store

    schedule = parse(args.schedule)  # validate cheap things before loading a model
    maps = MapSelection.parse(args.maps)
    items = _read_prompts(args)
    out = Path(args.out)
    _check_out(out)
    # Under torchrun, rank 0 creates the store while the others may still be starting: only it checks.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if out.exists() and not (args.resume or args.overwrite) and main_rank:
        raise StoreError(f"{str(out)!r} already exists; pass --resume to complete it or --overwrite to replace it")
    if out.exists() and not is_store(out):
        raise StoreError(f"{str(out)!r} exists and is not a taca-probe store; choose another --out")
    if args.resume and not out.exists():
        raise StoreError(f"--resume: no store at {str(out)!r}")

    from tqdm.auto import tqdm

    from .distributed import ranks_from_env
    from .models import load_pipeline, resolve_device, resolve_dtype
    from .recording import check_resume, probe, run_settings

    ranks = ranks_from_env()  # torchrun / accelerate launch: several processes share the samples
    try:
        device = ranks.device(resolve_device(args.device))
        dtype = resolve_dtype(args.dtype, device)
        pipe = load_pipeline(args.model, device=str(device), dtype=dtype)
        pipe.set_progress_bar_config(disable=True)  # one bar over the samples, not one per sample inside it
        call = _call_kwargs(args, pipe)
        run_attrs = {"guidance": call.get("guidance_scale"), "lora": None if args.lora is None else str(args.lora),
                     "lora_scale": args.lora_scale, "pipeline_kwargs": call}
        if args.resume:
            settings = run_settings(pipe, schedule=schedule, maps=maps, branch=args.branch, model=args.model)
            check_resume(out, settings, {"steps": call["num_inference_steps"], "height": call["height"],
                                         "width": call["width"], "guidance": call.get("guidance_scale")})
        plan = [(p, s) for p, seeds in items for s in seeds]
        if ranks.is_main:
            mode = "resume" if args.resume else "overwrite" if args.overwrite else "create"
        else:
            ranks.barrier()  # rank 0 creates (or checks) the whole store first
            mode = "resume"
        recorded = 0
        created_now = False
        with probe(pipe, out, schedule=schedule, maps=maps, branch=args.branch, mode=mode, lora=args.lora,
                   lora_scale=args.lora_scale, attrs=run_attrs, model=args.model) as run:
            if ranks.is_main:
                if run.writer is None:
                    run.create_planned(plan, call)  # every slot, before any sampling
                    created_now = True
                else:
                    _repair(out, run.writer)
                    _check_plan(out, [(p, s, b) for p, s, b, _ in run.writer.slots()], plan)
                ranks.barrier()
            todo = [i for i, (*_, done) in enumerate(run.writer.slots()) if not done]
            mine = ranks.share(todo)
            bar = tqdm(mine, desc="samples" if ranks.world == 1 else f"rank {ranks.rank}", unit="sample",
                       file=sys.stderr, position=ranks.rank)
            try:
                for slot in bar:
                    prompt, seed = plan[slot]
                    bar.set_postfix_str(f"seed {seed}: {short_prompt(prompt)}")
                    if run.sample(prompt, seed=seed, slot=slot, **call):
                        recorded += 1
            except BaseException:
                # A store this run created in which nothing finished would only block the rerun.
                if created_now and ranks.world == 1 and not any(done for *_, done in run.writer.slots()):
                    from .store import remove_store

                    remove_store(out)
                raise
        ranks.barrier()
        if ranks.is_main:
            print(f"store: {out}  ({len(todo)} recorded now by {ranks.world} process(es), "
                  f"{len(plan) - len(todo)} already complete)")
            print(_summary(out))
    finally:
        ranks.close()
    return 0


def _repair(path: Path, writer) -> None:
    """``--resume``: mark complete samples whose chunks are missing, moved or damaged for re-recording."""
    damaged = writer.damaged_slots()
    if damaged:
        listed = "; ".join(f"sample {slot}: {problems[0]}" for slot, problems in sorted(damaged.items())[:5])
        more = f" (and {len(damaged) - 5} more)" if len(damaged) > 5 else ""
        print(f"taca-probe: repairing {len(damaged)} damaged sample(s) of {str(path)!r}: {listed}{more}",
              file=sys.stderr)
        writer.mark_for_repair(sorted(damaged))


def _check_plan(path: Path, slots: list[tuple[str, int, int]], plan: list[tuple[str, int]]) -> None:
    """A resumed store must hold exactly this run's (prompt, seed) samples, in this order; the refusal
    names what differs (prompts, seeds, their count), the store's value against this run's."""
    from .store import UNKNOWN_SLOT, StoreError

    planned = [(p, int(s), 0) for p, s in plan]
    if len(slots) == len(planned) and all(a in (b, UNKNOWN_SLOT[:3]) for a, b in zip(slots, planned)):
        return
    known = [a for a in slots if a != UNKNOWN_SLOT[:3]]
    diffs = []

    def short(values: list) -> str:
        text = ",".join(map(str, values[:8])) + (",..." if len(values) > 8 else "")
        return f"{len(values)} [{text}]"

    seeds_then, seeds_now = list(dict.fromkeys(s for _, s, _ in known)), list(dict.fromkeys(s for _, s in plan))
    if seeds_then != seeds_now:
        diffs.append(f"--seeds: store has {short(seeds_then)}, now {short(seeds_now)}")
    prompts_then, prompts_now = list(dict.fromkeys(p for p, _, _ in known)), list(dict.fromkeys(p for p, _ in plan))
    if prompts_then != prompts_now:
        first = next((i for i, (a, b) in enumerate(zip(prompts_then, prompts_now)) if a != b),
                     min(len(prompts_then), len(prompts_now)))
        a = prompts_then[first] if first < len(prompts_then) else None
        b = prompts_now[first] if first < len(prompts_now) else None
        diffs.append(f"prompts: store has {len(prompts_then)}, now {len(prompts_now)}; prompt {first}: "
                     f"store {a!r}, now {b!r}")
    if not diffs:
        diff = next((i for i, (a, b) in enumerate(zip(slots, planned)) if a != b), min(len(slots), len(planned)))
        diffs.append(f"order: sample {diff} is {slots[diff][:2] if diff < len(slots) else None} in the store, "
                     f"{planned[diff][:2] if diff < len(planned) else None} now")
    raise StoreError(f"cannot resume {str(path)!r} with different samples: " + "; ".join(diffs))


def _summary(path: Path) -> str:
    """One screen: mean visual->text mass by block type at the first and last step."""
    from .store import open_run

    ds = open_run(path)
    if ds.sizes["sample"] == 0:
        return "(no complete sample)"
    lines = [f"{ds.sizes['sample']} sample(s), {ds.sizes['step']} steps, {ds.sizes['layer']} attention layers, "
             f"{ds.attrs.get('n_txt')} text + {ds.attrs.get('n_vis')} image tokens; schedule {ds.attrs.get('schedule')}"]
    uniform = ds.attrs["n_txt"] / (ds.attrs["n_txt"] + ds.attrs["n_vis"])
    first, last = 0, ds.sizes["step"] - 1
    t = ds["timestep"].isel(sample=0).values
    lines.append(f"mean visual->text attention mass (uniform attention would give {uniform:.4f}):")
    lines.append(f"  {'block type':<10} {'layers':>6} {'step 0 (t=%.0f)' % t[first]:>18} {'step %d (t=%.0f)' % (last, t[last]):>18}")
    mass = ds["vis_txt_mass"]
    if "branch" in mass.dims:
        mass = mass.sel(branch="cond")
    for bt in sorted(set(ds["block_type"].values.tolist())):
        sel = mass.where(ds["block_type"] == bt, drop=True)
        m = sel.mean(("sample", "layer", "head"))
        lines.append(f"  {bt:<10} {sel.sizes['layer']:>6} {float(m.isel(step=first)):>18.4f} {float(m.isel(step=last)):>18.4f}")
    if ds.attrs.get("schedule") not in (None, "none"):
        ref = ds["vis_txt_mass_ref"]
        if "branch" in ref.dims:
            ref = ref.sel(branch="cond")
        r = float(mass.isel(step=first).mean()) / float(ref.isel(step=first).mean())
        lines.append(f"  TACA amplification at step 0 (applied / gamma=1 mass): {r:.3f}x")
    return "\n".join(lines)


def _strict_json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _sweep_summary(folder: Path) -> str:
    """One line per (schedule, block type): mean visual->text mass at the first and last step."""
    from .sweep import open_sweep

    ds = open_sweep(folder)
    if ds.sizes.get("sample", 0) == 0:
        return "(no sample complete in every schedule)"
    mass = ds["vis_txt_mass"]
    if "branch" in mass.dims:
        mass = mass.sel(branch="cond")
    t = ds["timestep"].isel(sample=0).values
    last = ds.sizes["step"] - 1
    uniform = ds.attrs["n_txt"] / (ds.attrs["n_txt"] + ds.attrs["n_vis"])
    lines = [f"mean visual->text attention mass (uniform attention would give {uniform:.4f}):",
             f"  {'schedule':<24} {'block type':<10} {'step 0 (t=%.0f)' % t[0]:>16} {'step %d (t=%.0f)' % (last, t[last]):>16}"]
    for spec in ds["schedule"].values:
        for bt in sorted(set(ds["block_type"].values.tolist())):
            m = mass.sel(schedule=spec).where(ds["block_type"] == bt, drop=True).mean(("sample", "layer", "head"))
            lines.append(f"  {str(spec):<24} {bt:<10} {float(m.isel(step=0)):>16.4f} {float(m.isel(step=last)):>16.4f}")
    return "\n".join(lines)


def _dtype_name(dtype: str) -> str:
    return "string" if "StringDType" in dtype or dtype.startswith(("<U", "|S", "object")) else dtype


def format_info(info: dict) -> str:
    """``taca-probe info``: data variables, coordinates and internal arrays in aligned tables."""
    from .store import COORD_ORDER, VARIABLE_ORDER

    internal = ("complete", "chunk_manifest")  # bookkeeping that open_run hides
    coords = [n for n in info["arrays"] if n not in VARIABLE_ORDER and n not in internal]
    groups = {"data variables": [n for n in VARIABLE_ORDER if n in info["arrays"]],
              "coordinates": sorted(coords, key=lambda n: (COORD_ORDER.index(n) if n in COORD_ORDER else len(COORD_ORDER), n)),
              "internal (open_run hides them)": [n for n in internal if n in info["arrays"]]}
    rows = {}
    for name, a in info["arrays"].items():
        dims = ", ".join(f"{d}={n}" for d, n in zip(a["dims"], a["shape"]))
        rows[name] = (name, _dtype_name(a["dtype"]), f"({dims})", "chunks " + "x".join(map(str, a["chunks"])),
                      f"{a['stored_bytes'] / 1024:.1f} KiB")
    widths = [max(len(r[i]) for r in rows.values()) for i in range(4)] if rows else [0] * 4
    lines = [f"{info['path']}: taca-probe store, schema {info['schema']}",
             f"samples: {info['samples_complete']} complete, {info['samples_incomplete']} incomplete; "
             f"{info['stored_bytes'] / 2**20:.2f} MiB on disk"]
    if info.get("samples_damaged"):
        first = next(iter(info["samples_damaged"].values()))[0]
        lines.append(f"DAMAGED: {len(info['samples_damaged'])} complete sample(s) "
                     f"({', '.join(map(str, info['samples_damaged']))}); first: {first}; "
                     "`taca-probe record ... --resume` records them again")
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
    from .store import store_info

    info = store_info(args.store)
    if args.json:  # strict JSON: a NaN or inf attribute (older stores) is written as a string
        print(json.dumps(_strict_json(info), indent=2, default=str, allow_nan=False))
        return 0
    print(format_info(info))
    return 0


def _slug(text: str, width: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:width].rstrip("-") or "prompt"


def cmd_export_images(args: argparse.Namespace) -> int:
    """Every image of a store (or each store of a sweep) as PNG, named by prompt and seed."""
    from PIL import Image

    from .report import open_inputs as _open_inputs

    runs, _, _ = _open_inputs([args.store], None)
    out = Path(args.out)
    written = 0
    for label, spec, ds in runs:
        # a sweep: one folder per schedule; a store: the images directly in --out
        folder = out / _slug(spec, 40) if len(runs) > 1 or Path(args.store) != Path(label) else out
        folder.mkdir(parents=True, exist_ok=True)
        prompts = [str(p) for p in ds["prompt"].values]
        seeds = [int(s) for s in ds["seed"].values]
        batch = [int(b) for b in ds["batch_index"].values] if "batch_index" in ds.coords else [0] * len(seeds)
        for i, (prompt, seed, b) in enumerate(zip(prompts, seeds, batch)):
            name = f"{i:04d}_{_slug(prompt)}_seed{seed}" + (f"_{b}" if b else "") + ".png"
            Image.fromarray(ds["image"].isel(sample=i).values).save(folder / name)
            written += 1
    print(f"wrote {written} PNG image(s) to {out}/")
    return 0


# ------------------------------------------------------------------------------------------------
# sweep / figures
# ------------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    """``1.0,1.2,1.5`` -> list of floats."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number list {text!r}: expected e.g. 1.0,1.2,1.5") from None
    if not values:
        raise argparse.ArgumentTypeError(f"bad number list {text!r}: expected e.g. 1.0,1.2,1.5")
    return values


def _int_list(text: str) -> list[int]:
    """``0,1,2`` or ``0-3`` -> list of non-negative ints."""
    try:
        return int_ranges(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad step list {text!r}: {e}; expected e.g. 0,1,2 or 0-3") from None


def _add_sweep_parser(sub) -> None:
    from .sweep import DEFAULT_GAMMA0, DEFAULT_T_THRESH

    sw = sub.add_parser(
        "sweep",
        help="record a grid of TACA schedules over the same prompts and seeds (one store per schedule)",
        description="Record every prompt x seed under each schedule of a grid (step:G@T for every gamma0 G "
        "and t_thresh T, plus any --schedule), one store per schedule in the --out folder with a sweep.json "
        "manifest and every image as PNG; taca_probe.open_sweep(OUT) opens it as one Dataset with a "
        "'schedule' dimension, and `taca-probe figures OUT` draws it. " + EMBEDDED_NOTE,
    )
    _add_model_args(sw)
    _add_sampling_args(sw)
    sw.set_defaults(steps=None)  # None: the model's recommended steps (model_call_defaults), else 28
    for action in sw._actions:
        if action.dest == "steps":
            action.help = "denoising steps (default: the model's recommended, else 28)"
    sw.add_argument("--gamma0", type=_floats, default=list(DEFAULT_GAMMA0), metavar="G[,G...]",
                    help="gamma0 values of the grid (default %s; 1.0 is the stock model, recorded once as "
                    "'none')" % ",".join(f"{g:g}" for g in DEFAULT_GAMMA0))
    sw.add_argument("--t-thresh", type=_floats, default=list(DEFAULT_T_THRESH), metavar="T[,T...]",
                    help="threshold timesteps of the grid, 0..1000 (default %s, the paper's)"
                    % ",".join(f"{t:g}" for t in DEFAULT_T_THRESH))
    sw.add_argument("--schedule", action="append", dest="schedules", metavar="SPEC",
                    help="an extra schedule of any form (repeatable), e.g. first:1.2@3, beside the grid: "
                    + _schedule_help(None))
    sw.add_argument("--no-grid", action="store_true", help="record only the --schedule specs (and 'none')")
    sw.add_argument("--maps", default=None, metavar="SPEC",
                    help="also record per-token attention maps (needed for Fig. 3), e.g. 'steps=0-3' "
                    "(default: no maps)")
    sw.add_argument("--branch", default="cond", choices=["cond", "uncond", "both"],
                    help="CFG branch to record (default cond)")
    sw.add_argument("--lora", default=None, help="LoRA (path or loaded adapter name) active exactly where gamma != 1")
    sw.add_argument("--lora-scale", type=_lora_scale, default=1.0, help="LoRA weight while active (default 1)")
    sw.add_argument("--out", default="sweep", help="sweep folder (default ./sweep)")
    group = sw.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an existing sweep (same settings)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing sweep")
    sw.set_defaults(func=cmd_sweep)


def _add_figures_parser(sub) -> None:
    # literal copies of analysis.GROUP_BY, plotting.FIGURES and plotting.FORMATS (a test checks them), so
    # that building the parser does not import xarray
    GROUP_BY = ("block_type", "layer", "depth", "all")
    FIGURES = ("fig2", "fig3", "fig4", "fig5")
    FORMATS = ("png", "pdf", "svg")

    fg = sub.add_parser(
        "figures",
        help="render the paper's Figs. 2-4 (and a token ranking) from stores or sweep folders as PNG and PDF",
        description="Render, from run stores and/or sweep folders: fig2 (suppression: relative magnitude vs "
        "timestep with CI bands and references, layer x timestep heatmap, timestep slopes, TACA amplification), "
        "fig3 (TACA - baseline per-token attention maps at early steps; needs stores recorded with --maps), "
        "fig4 (gamma sweep: image grid and mass vs gamma0; needs a sweep), fig5 (token ranking). With "
        "--figures all (default) figures the inputs cannot support are skipped with the reason.",
    )
    fg.add_argument("stores", nargs="+", metavar="STORE", help="run stores and/or sweep folders")
    fg.add_argument("--out", default="figures", help="output folder (default ./figures)")
    fg.add_argument("--figures", default="all", metavar="LIST",
                    help=f"comma list of {', '.join(FIGURES)}, or all (default)")
    fg.add_argument("--baseline", default=None, metavar="STORE|SPEC",
                    help="the baseline run (default: the one recorded with schedule none)")
    fg.add_argument("--treated", default=None, metavar="STORE|SPEC",
                    help="the TACA run of Figs. 2-3 (default: step:1.2@970 if present, else the first other)")
    fg.add_argument("--by", default="block_type", choices=list(GROUP_BY),
                    help="layer grouping of the Fig. 2 lines (default block_type)")
    fg.add_argument("--sample", type=int, default=0, help="which paired sample Fig. 3 shows (default 0)")
    fg.add_argument("--steps", type=_int_list, default=None, metavar="LIST",
                    help="Fig. 3 steps, e.g. 0-3 (default: the first steps with maps, at most 4)")
    fg.add_argument("--max-tokens", type=_positive_int, default=8,
                    help="Fig. 3 rows: this many prompt tokens whose maps changed most (default 8)")
    fg.add_argument("--tokens", default=None, metavar="LIST",
                    help="Fig. 3 rows: these tokens instead, as words or text positions, e.g. red,circle or 2,17")
    fg.add_argument("--overlay", action="store_true", help="Fig. 3: draw the maps over the decoded image")
    fg.add_argument("--format", default="png,pdf", metavar="LIST",
                    help=f"comma list of {', '.join(FORMATS)} (default png,pdf)")
    fg.add_argument("--dpi", type=_bounded_int(10, 1200), default=150, help="PNG resolution (default 150)")
    fg.add_argument("--n-resamples", type=_bounded_int(100, 1_000_000), default=2000, help="bootstrap resamples (default 2000)")
    fg.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    fg.add_argument("--branch", default=None, choices=["cond", "uncond"], help="CFG branch of stores that hold both")
    fg.add_argument("--lazy", action="store_true", help="open stores with dask (for stores larger than memory)")
    fg.set_defaults(func=cmd_figures)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .recording import MapSelection
    from .schedules import parse
    from .sweep import MANIFEST, SweepError, is_sweep, run_sweep, sweep_schedules

    extra = [parse(s).spec for s in (args.schedules or [])]  # validate cheap things before loading a model
    if args.no_grid and not extra:
        raise TacaProbeError("--no-grid needs at least one --schedule SPEC")
    for t in [] if args.no_grid else args.t_thresh:
        if not 0 <= t <= 1000:
            raise TacaProbeError(f"--t-thresh {t:g} is not a timestep in 0..1000")
    specs = (sweep_schedules(gamma0=[], t_thresh=[], extra=extra) if args.no_grid
             else sweep_schedules(gamma0=args.gamma0, t_thresh=args.t_thresh, extra=extra))
    maps = MapSelection.parse(args.maps)
    items = _read_prompts(args)
    out = Path(args.out)
    _check_out(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"{str(out)!r} is a file; choose another --out")
    non_empty = out.exists() and any(out.iterdir())
    if non_empty and not (args.resume or args.overwrite):
        raise SweepError(f"{str(out)!r} already exists; pass --resume to complete it or --overwrite to replace it")
    if args.resume and not is_sweep(out):
        raise SweepError(f"--resume: no sweep at {str(out)!r} (no {MANIFEST})")
    if args.overwrite and non_empty and not is_sweep(out):
        raise SweepError(f"refusing to overwrite {str(out)!r}: it is not a sweep folder (no {MANIFEST})")

    from .models import load_pipeline, resolve_device, resolve_dtype
    from .sweep import read_manifest

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, device=str(device), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)  # the sweep shows one bar over all samples
    _check_size(pipe, args.height, args.width)
    call = {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
            "guidance_scale": args.guidance, "max_sequence_length": args.max_sequence_length}
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "create"
    folder = run_sweep(pipe, out, prompts=items, schedules=specs, maps=maps, branch=args.branch, mode=mode,
                       call=call, lora=args.lora, lora_scale=args.lora_scale, model_name=args.model)
    doc = read_manifest(folder)
    print(f"sweep: {folder}  ({len(doc['schedules'])} schedules x {len(doc['plan'])} samples; "
          f"{', '.join(f'{k}={v}' for k, v in doc['call'].items())})")
    for entry in doc["schedules"]:
        print(f"  {entry['spec']:<24} {entry['samples_complete']:>4} samples  {entry['store']}  {entry['images']}/")
    print(_sweep_summary(folder))
    print(f"open it with taca_probe.open_sweep({str(folder)!r}); draw it with: taca-probe figures {folder} "
          f"--out {folder / 'figures'}")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .report import render_figures

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    res = render_figures(
        args.stores, args.out, figures=args.figures, baseline=args.baseline, treated=args.treated, by=args.by,
        sample=args.sample, steps=args.steps, max_tokens=args.max_tokens, overlay=args.overlay, formats=formats,
        tokens=[t.strip() for t in args.tokens.split(",") if t.strip()] if args.tokens else None,
        dpi=args.dpi, n_resamples=args.n_resamples, seed=args.seed, branch=args.branch,
        chunks={} if args.lazy else None,
    )
    # one line per figure (written or skipped), naming the run it was drawn from
    print(f"wrote {len(res['written'])} figure(s) as {', '.join(formats)} to {args.out}/")
    width = max(map(len, res["written"]), default=0)
    for name in res["written"]:
        print(f"  {name:<{width}}  from {res['sources'][name]}")
    for group, reason in res["skipped"].items():
        print(f"  skipped {group}: {reason}")
    return 0


def _add_report_parser(sub) -> None:
    rp = sub.add_parser(
        "report",
        help="write one self-contained interactive HTML page (images, suppression, heat map, map viewer)",
        description="Write DIR/index.html, which opens from disk with no server and no network: the generated "
        "images; visual->text mass over timesteps by block type with 95% intervals and the uniform reference; a "
        "layer x step heat map; for stores with maps, a viewer of the head-mean map of a chosen sample, step, "
        "layer and text token; for a TACA/baseline pair (or a sweep), the same side by side with the difference.",
    )
    rp.add_argument("stores", nargs="+", metavar="STORE", help="run stores and/or sweep folders")
    rp.add_argument("--out", default="report", help="output folder (default ./report)")
    rp.add_argument("--baseline", default=None, metavar="STORE|SPEC",
                    help="the baseline run (default: the one recorded with schedule none)")
    rp.add_argument("--treated", default=None, metavar="STORE|SPEC",
                    help="the run compared with it (default: step:1.2@970 if present, else the first other)")
    rp.add_argument("--n-resamples", type=_positive_int, default=1000, help="bootstrap resamples (default 1000)")
    rp.add_argument("--branch", default=None, choices=["cond", "uncond"], help="CFG branch of stores that hold both")
    rp.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    t0 = time.perf_counter()
    res = report(args.stores, args.out, baseline=args.baseline, treated=args.treated,
                 n_resamples=args.n_resamples, branch=args.branch)
    print(f"wrote {res.path} ({res.size_bytes / 2**20:.1f} MiB, runs: {', '.join(res.runs)}) in "
          f"{time.perf_counter() - t0:.1f} s; open it in a browser (no server needed)")
    return 0


# ------------------------------------------------------------------------------------------------
# bench attention
# ------------------------------------------------------------------------------------------------


def cmd_bench_attention(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from .bench import DEFAULT_SHAPES, bench_attention, format_rows, parse_shape
    from .models import resolve_device, resolve_dtype

    shapes = [parse_shape(s) for s in args.shape] if args.shape else list(DEFAULT_SHAPES)
    if args.heads:
        shapes = [dataclasses.replace(s, heads=args.heads) for s in shapes]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    try:
        rows = bench_attention(shapes, device=device, dtype=dtype, gamma=args.gamma, repeats=args.repeats,
                               variants=variants, memory=not args.no_memory,
                               progress=lambda msg: print(msg, file=sys.stderr))
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        raise TacaProbeError(f"--shape: a shape does not fit in {device} memory; choose a smaller one") from None
    meta = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), **_versions(), "cuda": torch.version.cuda}
    if args.json == "-":
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(format_rows(rows))
    print(f"({meta['device_name']}, {meta['threads']} thread(s), torch {meta['torch']}, median of {args.repeats})")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_bench_e2e(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_e2e
    from .models import resolve_device, resolve_dtype
    from .recording import MapSelection
    from .schedules import parse

    parse(args.schedule)
    MapSelection.parse(args.maps)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    res = bench_e2e(device=device, dtype=dtype, width=args.width,
                    layers=None if args.depth == "full" else args.layers, image_tokens=args.image_tokens,
                    steps=args.steps, repeats=args.repeats, schedule=args.schedule, maps=args.maps,
                    compile=args.compile, progress=lambda msg: print(msg, file=sys.stderr))
    res["meta"] = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "threads": torch.get_num_threads(), **_versions(), "cuda": torch.version.cuda}
    if args.json == "-":
        print(json.dumps(res, indent=2))
        return 0
    blocks = f"{res['joint_blocks']}" + (f" + {res['single_blocks']} single" if res["single_blocks"] else "")
    print(f"{res['width']} width ({res['hidden']} = {res['heads']} heads), {blocks} blocks "
          f"({res['parameters_b']:.2f} B parameters), {res['image_tokens']} image + {res['text_tokens']} text tokens, "
          f"batch {res['batch']}, {res['steps']} steps, {res['dtype']} on {res['meta']['device_name']}"
          + (f", compiled ({res['compile']})" if res["compile"] else "") + f"; statistics: {res['stats_backend']}")
    for name, v in res["variants"].items():
        mem = f", peak {v['peak_mib']:.0f} MiB" if v["peak_mib"] is not None else ""
        print(f"  {name:<11} {v['median_s']:.3f} s/sample, {v['per_step_s'] * 1e3:.1f} ms/step, "
              f"{v['ratio']:.3f}x{mem} (median of {args.repeats})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------------


def _settle() -> None:
    """After an error, let zarr's reads still in flight finish (only if zarr was used at all), so that
    no "Task was destroyed but it is pending!" or task traceback follows the one-line message."""
    if "zarr" in sys.modules:
        from .store import settle_pending_reads

        settle_pending_reads()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # inside the try: it imports torch, and Ctrl-C may come meanwhile
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except TacaProbeError as e:
        _settle()
        print(f"taca-probe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taca-probe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `taca-probe info STORE | head`
        return 0
    except OSError as e:  # disk full, read-only, a file where a folder should be: the user's to fix
        where = f": {e.filename!r}" if e.filename else ""
        print(f"taca-probe: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # an internal error: still one line, unless debugging
        if os.environ.get("TACA_PROBE_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"taca-probe: internal error: {type(e).__name__}: {first} (set TACA_PROBE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
