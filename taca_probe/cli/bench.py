"""``bench attention`` and ``bench e2e``: benchmarks (not tests) of TACA and the probe against stock."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import diffusers
import torch
import transformers

from .. import __version__
from ..bench import DEFAULT_SHAPES, bench_attention, bench_e2e, format_rows, parse_shape
from ..errors import TacaProbeError
from ..models import resolve_device, resolve_dtype
from ..schedules import GAMMA_MAX, GAMMA_MIN, parse
from ..selection import MapSelection
from .args import MAX_STEPS, Deprecated, bench_args, bounded, check_json, emit, json_args, positive_int

_PRESETS = "sd35-medium (default, 24 x 64), sd3-medium, sd35-large, flux-dev"


def add_parsers(sub, parser_class) -> None:
    bench = sub.add_parser("bench", help="benchmarks (not tests): the cost of TACA against stock attention")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=parser_class)
    ba = bsub.add_parser("attention", parents=[bench_args(7), json_args("the rows")],
                         help="time stock SDPA, TACA, the naive materialized path and eager flex",
                         description="Interleaved timings, median of N, ratio to stock SDPA, peak extra memory.")
    ba.add_argument("--shape", action="append", metavar="B,H,NTXT,NVIS,D[,ORDER]",
                    help="a shape to time (repeatable; ORDER txt-first (default) or img-first); default: the "
                    "FLUX 1024px shape 1,24,512,4096,128 and the SD3.5 shape 2,24,333,4096,64,img-first")
    ba.add_argument("--heads", type=positive_int, default=None, help="override the head count of every shape")
    ba.add_argument("--gamma", type=bounded(GAMMA_MIN, GAMMA_MAX, integer=False), default=1.2,
                    help="gamma of the TACA variants, > 0 and finite as a float32, as in schedules (default 1.2)")
    ba.add_argument("--variants", default="sdpa,taca,taca+masses,naive,flex",
                    help="comma list of sdpa, taca, taca+masses (the device's default statistics path), "
                    "taca+masses:triton, taca+masses:fused, taca+masses:block, taca+maps, naive, flex, flex-compiled")
    ba.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ba.set_defaults(func=cmd_bench_attention)
    be = bsub.add_parser("e2e", parents=[bench_args(5), json_args()], help="time whole sampling runs with and without the probe",
                         description="A random-weight SD3 transformer of a real width (text encoders and VAE "
                         "stay tiny) samples with CFG, interleaved with and without recording; median of N.")
    be.add_argument("--preset", default="sd35-medium", help=f"transformer width preset: {_PRESETS}")
    be.add_argument("--width", dest="preset", action=Deprecated, new="--preset",
                    help=argparse.SUPPRESS)  # --width means image width in every other command
    be.add_argument("--layers", type=positive_int, default=2, help="transformer blocks at reduced depth (default 2)")
    be.add_argument("--depth", choices=("reduced", "full"), default="reduced",
                    help="full: the published depth (FLUX.1-dev 19 + 38 blocks, SD3.5-Large 38), weights made on "
                    "the device; reduced (default): --layers blocks")
    be.add_argument("--compile", choices=("whole", "regional"), default=None,
                    help="time compiled stock against compiled with the probe: torch.compile(transformer), or "
                    "diffusers' compile_repeated_blocks(fullgraph=True) (FLUX)")
    be.add_argument("--image-tokens", type=positive_int, default=1024, help="image tokens, a square (default 1024)")
    be.add_argument("--steps", type=bounded(1, MAX_STEPS), default=4, help="denoising steps per sample (default 4)")
    be.add_argument("--schedule", default="none", help="TACA schedule in both variants (default none)")
    be.add_argument("--maps", default=None,
                    help="also time the probe with these maps (e.g. 'steps=0-4;tokens=0-19'; default: masses only)")
    be.set_defaults(func=cmd_bench_e2e)
    bench.set_defaults(func=lambda args: (_ for _ in ()).throw(TacaProbeError("bench: choose a benchmark: attention, e2e")))


def _setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, dict]:
    check_json(args.json)  # before the timings, which a failed write at the end would lose
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    meta = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "taca_probe": __version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda}
    return device, dtype, meta


def cmd_bench_attention(args: argparse.Namespace) -> int:
    shapes = [parse_shape(s) for s in args.shape] if args.shape else list(DEFAULT_SHAPES)
    if args.heads:
        shapes = [dataclasses.replace(s, heads=args.heads) for s in shapes]
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    device, dtype, meta = _setup(args)
    try:
        rows = bench_attention(shapes, device=device, dtype=dtype, gamma=args.gamma, repeats=args.repeats,
                               variants=variants, memory=not args.no_memory,
                               progress=lambda msg: print(msg, file=sys.stderr))
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        raise TacaProbeError(f"--shape: a shape does not fit in {device} memory; choose a smaller one") from None
    emit(args, {"meta": meta, "rows": rows}, format_rows(rows) + f"\n({meta['device_name']}, {meta['threads']} "
          f"thread(s), torch {meta['torch']}, median of {args.repeats})")
    return 0


def cmd_bench_e2e(args: argparse.Namespace) -> int:
    parse(args.schedule)
    MapSelection.parse(args.maps)
    device, dtype, meta = _setup(args)
    res = bench_e2e(device=device, dtype=dtype, width=args.preset,
                    layers=None if args.depth == "full" else args.layers, image_tokens=args.image_tokens,
                    steps=args.steps, repeats=args.repeats, schedule=args.schedule, maps=args.maps,
                    compile=args.compile, progress=lambda msg: print(msg, file=sys.stderr))
    res["meta"] = meta
    blocks = f"{res['joint_blocks']}" + (f" + {res['single_blocks']} single" if res["single_blocks"] else "")
    lines = [f"{res['width']} width ({res['hidden']} = {res['heads']} heads), {blocks} blocks "
             f"({res['parameters_b']:.2f} B parameters), {res['image_tokens']} image + {res['text_tokens']} text tokens, "
             f"batch {res['batch']}, {res['steps']} steps, {res['dtype']} on {meta['device_name']}"
             + (f", compiled ({res['compile']})" if res["compile"] else "") + f"; statistics: {res['stats_backend']}"]
    width = max([11, *map(len, res["variants"])])
    for name, v in res["variants"].items():
        mem = f", peak {v['peak_mib']:.0f} MiB" if v["peak_mib"] is not None else ""
        lines.append(f"  {name:<{width}} {v['median_s']:.3f} s/sample, {v['per_step_s'] * 1e3:.1f} ms/step, "
                     f"{v['ratio']:.3f}x{mem} (median of {args.repeats})")
    emit(args, res, "\n".join(lines))
    return 0
