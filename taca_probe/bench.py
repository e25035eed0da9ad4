"""Benchmarks (never timed tests): the cost of TACA and the probe against stock attention.

``bench attention`` times the :data:`VARIANTS` at given shapes, interleaved, median of N, and
measures each one's peak extra memory (CUDA: ``max_memory_allocated``; CPU: the allocator's
running total from ``torch.profiler`` memory events). ``bench e2e`` times whole sampling runs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch.nn.attention.flex_attention import flex_attention
from torch.profiler import ProfilerActivity, profile

from .attention import JointLayout, attention_statistics, describe_stats_backend, taca_attention
from .errors import TacaProbeError
from .intervention import taca
from .logs import quiet
from .models import load_pipeline
from .runner import probe

__all__ = ["AttnShape", "DEFAULT_SHAPES", "bench_attention", "parse_shape", "VARIANTS"]


@dataclass(frozen=True)
class AttnShape:
    """One joint-attention problem: ``batch x heads x (n_txt + n_vis) x head_dim``."""

    name: str
    batch: int
    heads: int
    n_txt: int
    n_vis: int
    head_dim: int
    txt_first: bool


#: FLUX.1 at 1024x1024 (512 T5 tokens, 64x64 latent tokens, 24 heads of 128) and SD3.5 at
#: 1024x1024 (77 CLIP + 256 T5 tokens, 24 heads of 64, batch 2 for CFG).
DEFAULT_SHAPES = (
    AttnShape("flux-1024", 1, 24, 512, 4096, 128, True),
    AttnShape("sd35-1024", 2, 24, 333, 4096, 64, False),
)


def parse_shape(spec: str) -> AttnShape:
    """``B,H,NTXT,NVIS,D`` (text first) or ``B,H,NTXT,NVIS,D,img-first`` -> :class:`AttnShape`."""
    parts = [p.strip() for p in spec.split(",")]
    try:
        order = parts[5] if len(parts) == 6 else "txt-first"
        if len(parts) not in (5, 6) or order not in ("txt-first", "img-first"):
            raise ValueError
        b, h, nt, nv, d = (int(p) for p in parts[:5])
        if min(b, h, nt, nv, d) <= 0:
            raise ValueError
    except ValueError:
        raise TacaProbeError(f"--shape {spec!r}: expected B,H,NTXT,NVIS,D[,txt-first|img-first] "
                             "with positive integers") from None
    # named by its order: the table's label spells the dimensions, which --heads may change
    return AttnShape(order, b, h, nt, nv, d, order == "txt-first")


def _naive(q, k, v, layout: JointLayout, gamma: float):
    # The official TACA code's SD3.5 path, kept as it is: PyTorch's documented reference SDPA
    # (bias, softmax, dropout at p=0) with the visual->text block of the full logits times gamma.
    txt, vis = layout.split(q.shape[2])
    n = q.shape[2]
    attn_bias = torch.zeros(n, n, dtype=q.dtype, device=q.device)
    attn_weight = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    attn_weight[:, :, vis, txt] = attn_weight[:, :, vis, txt] * gamma
    attn_weight += attn_bias
    attn_weight = torch.softmax(attn_weight, dim=-1)
    attn_weight = torch.dropout(attn_weight, 0.0, train=True)
    return attn_weight @ v


def _score_mod(layout: JointLayout, n: int, gamma: float):
    """The official FLUX code's ``score_mod``: gamma on visual-query x text-key scores."""
    n_txt, txt_first = layout.n_txt, layout.txt_first

    def score_mod(score, b, h, q_idx, kv_idx):
        if txt_first:
            cross = (q_idx >= n_txt) & (kv_idx < n_txt)
        else:
            cross = (q_idx < n - n_txt) & (kv_idx >= n - n_txt)
        return torch.where(cross, score * gamma, score)

    return score_mod


def _flex(q, k, v, layout: JointLayout, gamma: float):
    with warnings.catch_warnings():
        # Eager on purpose: it is what the official code runs; torch's advice to compile is known.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=_score_mod(layout, q.shape[2], gamma))


_FLEX_COMPILED: dict = {}


def _flex_compiled(q, k, v, layout: JointLayout, gamma: float):
    # The strongest public alternative: flex_attention compiled with the same score_mod (one
    # compilation per shape and gamma, done in the warm-up).
    key = (layout, q.shape[2], gamma)
    if key not in _FLEX_COMPILED:  # one function object per problem, so the compiled graph is reused
        _FLEX_COMPILED[key] = (torch.compile(flex_attention, dynamic=False), _score_mod(layout, q.shape[2], gamma))
    fn, score_mod = _FLEX_COMPILED[key]
    return fn(q, k, v, score_mod=score_mod)


def _taca_stats(q, k, v, layout: JointLayout, gamma: float, n_map_tokens: int = 0, backend: str | None = None):
    """What the probe does in each recorded call: TACA with its parts, then the statistics."""
    out, parts = taca_attention(q, k, v, layout, gamma, with_parts=True)
    tokens = torch.arange(min(n_map_tokens, layout.n_txt), device=q.device) if n_map_tokens else None
    return out, attention_statistics(q, k, layout, gamma, parts, map_tokens=tokens, backend=backend)


VARIANTS: dict[str, Callable] = {
    "sdpa": lambda q, k, v, layout, gamma: F.scaled_dot_product_attention(q, k, v),
    "taca": taca_attention,
    # TACA + every mass (no maps) on the device's default statistics path, and on each path
    "taca+masses": _taca_stats,
    **{f"taca+masses:{b}": functools.partial(_taca_stats, backend=b) for b in ("fused", "block", "triton")},
    "taca+maps": functools.partial(_taca_stats, n_map_tokens=64),  # + head-mean maps of 64 text tokens
    "naive": _naive,
    "flex": _flex,
    "flex-compiled": _flex_compiled,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_extra_bytes(fn: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    # The profiler's C++ side prints start/stop lines on stderr: silence the descriptor meanwhile.
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()  # the result is freed at once, inside the profile
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return int(max(totals, default=0))


def bench_attention(shapes: list[AttnShape] | tuple[AttnShape, ...] = DEFAULT_SHAPES, *,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, gamma: float = 1.2,
                    repeats: int = 7, warmup: int = 1,
                    variants: tuple[str, ...] = ("sdpa", "taca", "taca+masses", "naive", "flex"),
                    memory: bool = True, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Time and measure the attention variants at each shape.

    Returns
    -------
    list of dict
        One row per (shape, variant): ``shape``, ``variant``, ``device``, ``dtype``, ``gamma``,
        ``median_ms``, ``times_ms``, ``ratio_to_sdpa``, ``peak_extra_mib`` (None when not
        measured), ``error`` (a variant that failed, e.g. flex where unavailable).
    """
    device = torch.device(device)
    variants = tuple(dict.fromkeys(variants))  # one given twice is timed once, and listed once
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:  # none would time nothing and print an empty table
        raise TacaProbeError(f"--variants: unknown variant(s) {sorted(unknown) or '(none)'}; "
                             f"choose from {', '.join(VARIANTS)}")
    rows: list[dict] = []
    for shape in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        n = shape.n_txt + shape.n_vis
        q, k, v = (torch.randn(shape.batch, shape.heads, n, shape.head_dim, generator=g).to(device, dtype)
                   for _ in range(3))
        layout = JointLayout(shape.n_txt, shape.txt_first)
        fns, errors = {}, {}
        _FLEX_COMPILED.clear()  # score_mod closes over this shape's layout
        for name in variants:
            fn = VARIANTS[name]
            try:
                with torch.no_grad():
                    for _ in range(warmup):
                        fn(q, k, v, layout, gamma)
                    _sync(device)
                fns[name] = fn
            except Exception as e:  # a variant unavailable here is reported, not fatal
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        times: dict[str, list[float]] = {name: [] for name in fns}
        with torch.no_grad():
            for r in range(repeats):  # interleaved, so drift hits every variant alike
                for name, fn in fns.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    out = fn(q, k, v, layout, gamma)
                    _sync(device)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    del out
                if progress:
                    progress(f"{shape.name}: repeat {r + 1}/{repeats}")
            peaks = {name: _peak_extra_bytes(lambda: fn(q, k, v, layout, gamma), device)
                     for name, fn in fns.items()} if memory else {}
        base = statistics.median(times["sdpa"]) if "sdpa" in times else None
        for name in variants:
            med = statistics.median(times[name]) if name in times else None
            rows.append({
                "shape": asdict(shape), "variant": name, "device": str(device),
                "dtype": str(dtype).removeprefix("torch."), "gamma": gamma, "median_ms": med,
                "times_ms": times.get(name), "ratio_to_sdpa": (med / base) if (med is not None and base) else None,
                "peak_extra_mib": (peaks[name] / 2**20) if name in peaks else None, "error": errors.get(name),
            })
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`bench_attention` rows, with memory relative to naive."""
    labels = [f"{s['name']} B{s['batch']}H{s['heads']} {s['n_txt']}+{s['n_vis']} D{s['head_dim']}"
              for s in (r["shape"] for r in rows)]
    w, v = max([34, *map(len, labels)]), max([11, *(len(r["variant"]) for r in rows)])  # long names stay aligned
    lines = [f"{'shape':<{w}} {'variant':<{v}} {'median ms':>10} {'x sdpa':>7} {'peak MiB':>9} {'% naive':>8}"]
    naive_peak = {label: r["peak_extra_mib"] for r, label in zip(rows, labels)  # by label: names need not differ
                  if r["variant"] == "naive" and r["peak_extra_mib"]}
    for r, label in zip(rows, labels):
        if r["error"]:
            lines.append(f"{label:<{w}} {r['variant']:<{v}} unavailable: {r['error']}")
            continue
        peak = r["peak_extra_mib"]
        npk = naive_peak.get(label)
        pct = f"{100 * peak / npk:7.1f}%" if (peak is not None and npk) else "       -"
        peak_s = f"{peak:9.1f}" if peak is not None else "        -"
        ratio = r["ratio_to_sdpa"]  # None when sdpa was not among the variants
        ratio_s = f"{ratio:6.2f}x" if ratio is not None else "      -"
        lines.append(f"{label:<{w}} {r['variant']:<{v}} {r['median_ms']:10.2f} {ratio_s} {peak_s} {pct}")
    return "\n".join(lines)


#: Widths of published transformers (heads x head dim; the rest follows from the config rules).
WIDTHS = {
    "sd35-medium": dict(num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536, patch_size=2),
    "sd3-medium": dict(num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536, patch_size=2),
    "sd35-large": dict(num_attention_heads=38, attention_head_dim=64, caption_projection_dim=2432, patch_size=2),
    "flux-dev": dict(num_attention_heads=24, attention_head_dim=128, axes_dims_rope=(16, 56, 56)),
}
#: Depth of the published models (``--depth full``): SD3 blocks; FLUX joint + single-stream blocks.
FULL_DEPTH = {"sd35-medium": (24, 0), "sd3-medium": (24, 0), "sd35-large": (38, 0), "flux-dev": (19, 38)}


def realistic_sd3_pipeline(*, width: str = "sd35-medium", layers: int | None = 2, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, seed: int = 0):
    """An embedded tiny pipeline with its transformer replaced by a random one of a real width.

    ``layers=None`` builds the published depth (:data:`FULL_DEPTH`: FLUX.1-dev 19 + 38 blocks,
    11.9 B parameters; SD3.5-Large 38 blocks, 8.1 B), its weights created directly on ``device``
    in ``dtype``. Text encoders, tokenizers, VAE and scheduler stay tiny: their cost is the same
    with and without the probe, and the transformer's input projections adapt to their sizes.
    """
    if width not in WIDTHS:
        raise TacaProbeError(f"unknown --preset {width!r}; choose from {', '.join(WIDTHS)}")
    flux = width.startswith("flux")
    pipe = load_pipeline("tiny-flux" if flux else "tiny-sd3", device="cpu", dtype=torch.float32)
    small = pipe.transformer.config
    if layers is None:
        joint, single = FULL_DEPTH[width]
    else:  # reduced depth: FLUX splits `layers` between the two kinds of block
        joint, single = (max(1, layers // 3), max(1, layers - layers // 3)) if flux else (layers, 0)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in the run's dtype, on the device: no fp32 copy of 12 B weights
    try:
        common = dict(in_channels=small.in_channels, num_layers=joint, joint_attention_dim=small.joint_attention_dim,
                      pooled_projection_dim=small.pooled_projection_dim, **WIDTHS[width])
        with torch.device(device):
            if flux:
                big = FluxTransformer2DModel(patch_size=1, num_single_layers=single, guidance_embeds=True, **common)
            else:
                big = SD3Transformer2DModel(sample_size=128, out_channels=small.out_channels, pos_embed_max_size=192,
                                            qk_norm="rms_norm", **common)
    finally:
        torch.set_default_dtype(previous)
    pipe.transformer = big.eval().requires_grad_(False)
    with quiet():  # diffusers' advice on casting (use from_pretrained's torch_dtype) is not the user's to act on
        pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_e2e(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, width: str = "sd35-medium",
              layers: int | None = 2, image_tokens: int = 1024, steps: int = 4, repeats: int = 5,
              schedule: str = "none", maps: str | None = None, compile: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Time whole sampling runs without the probe, with it (all masses) and, with ``maps``, with
    masses and maps, interleaved; median of ``repeats``.

    SD3 widths sample with CFG (batch 2), FLUX widths guidance-distilled (batch 1). ``compile`` =
    ``"whole"`` (``torch.compile(pipe.transformer)``) or ``"regional"`` (``compile_repeated_blocks``)
    times compiled stock against compiled with the probe.

    Returns a dict with, per variant (``plain``, ``probe``, ``probe+maps``), the seconds of each
    run, their median, seconds per denoising step, the ratio to ``plain`` and (CUDA) peak memory.
    """
    side = int(round(math.sqrt(image_tokens)))
    if side * side != image_tokens:
        raise TacaProbeError(f"--image-tokens {image_tokens} must be a square number (e.g. 1024 = 32 x 32)")
    if compile not in (None, "whole", "regional"):
        raise TacaProbeError(f"unknown compile mode {compile!r}; choose from whole, regional")
    device = torch.device(device)
    pipe = realistic_sd3_pipeline(width=width, layers=layers, device=device, dtype=dtype)
    flux = width.startswith("flux")
    if compile == "whole":
        pipe.transformer = torch.compile(pipe.transformer)
    elif compile == "regional":
        if not getattr(pipe.transformer, "_repeated_blocks", None):
            raise TacaProbeError(f"{type(pipe.transformer).__name__} has no repeated blocks for regional "
                                 "compilation; use --compile whole")
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    px = side * pipe.vae_scale_factor * 2  # SD3: 2x2 patches; FLUX: 2x2 packing
    kw = {"num_inference_steps": steps, "height": px, "width": px, "guidance_scale": 3.5 if flux else 5.0}
    tmp = tempfile.mkdtemp(prefix="taca-bench-")
    variants = {"plain": None, "probe": None, **({"probe+maps": maps} if maps else {})}  # name -> maps
    times: dict[str, list[float]] = {name: [] for name in variants}
    peak: dict[str, int] = {name: 0 for name in variants}

    def run(name: str, r: int, timed: bool) -> None:
        prompt, gen = f"sample {r}", torch.Generator().manual_seed(r)
        if timed:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if name == "plain":
            with taca(pipe, schedule):
                pipe(prompt, generator=gen, output_type="np", **kw)
        else:
            with probe(pipe, os.path.join(tmp, f"{name}.zarr"), schedule=schedule, maps=variants[name],
                       mode="resume") as rec:
                rec.sample(prompt, seed=r, **kw)
        if timed:
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))

    try:
        for name in variants:  # warm-up (and compilation) of every path
            run(name, 10_000, timed=False)
        for r in range(repeats):
            for name in variants:  # interleaved, so drift hits every variant alike
                run(name, r, timed=True)
            if progress:
                progress(f"e2e: repeat {r + 1}/{repeats}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = pipe.transformer
    cfg = getattr(base, "_orig_mod", base).config
    plain = statistics.median(times["plain"])
    out = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "width": width,
        "depth": "full" if layers is None else "reduced",
        "joint_blocks": cfg.num_layers, "single_blocks": getattr(cfg, "num_single_layers", 0),
        "hidden": cfg.num_attention_heads * cfg.attention_head_dim, "heads": cfg.num_attention_heads,
        "parameters_b": sum(p.numel() for p in base.parameters()) / 1e9,
        "image_tokens": image_tokens, "text_tokens": 512 if flux else 77 + 256, "steps": steps,
        "batch": 1 if flux else 2, "schedule": schedule, "maps": maps, "compile": compile,
        "stats_backend": describe_stats_backend(device, dtype), "variants": {},
    }
    for name in variants:
        med = statistics.median(times[name])
        out["variants"][name] = {
            "times_s": times[name], "median_s": med, "per_step_s": med / steps, "ratio": med / plain,
            "peak_mib": peak[name] / 2**20 if device.type == "cuda" else None,  # CUDA only
        }
    # the fields earlier versions wrote, for scripts that read them
    out.update(plain_median_s=plain, probe_median_s=out["variants"]["probe"]["median_s"],
               ratio=out["variants"]["probe"]["ratio"])
    return out
