"""The probe: record cross-modal attention statistics while a pipeline samples.

``probe(pipe, path, schedule=..., maps=..., branch=...)`` installs TACA (shared machinery with
:func:`taca_probe.taca`, including ``schedule="none"`` for the stock model) with an observer that
computes, in the same attention call that produces the output, the statistics of
:func:`taca_probe.attention.attention_statistics`. They stay on the device during a transformer
call and cross to the host once per call (one copy, one sync), then go to the store when a sample
is finished. Each ``run.sample(...)`` appends one sample per generated image.

Which transformer calls are recorded (``branch``):

- SD3 with batched CFG: one call per step with batch ``[uncond..., cond...]``; ``cond`` takes the
  second half of the rows, ``uncond`` the first.
- FLUX: one call per step (guidance-distilled, ``cond``), or two with true CFG, cond then uncond.
- Further calls in a step (SD3 skip-layer guidance) are not recorded.
"""

from __future__ import annotations

import datetime
import fnmatch
import inspect
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .selection import MapSelection
from .attention import JointLayout, attention_statistics, describe_stats_backend
from .errors import TacaProbeError
from .intervention import TacaConfig, TacaHandle, apply_taca
from .models import model_call_defaults, model_name
from .processors import Site
from .schedules import Schedule, parse
from .store import UNKNOWN_SLOT, RunLayout, RunWriter, StoreError, is_store, remove_store

__all__ = ["MapSelection", "probe", "Run", "BRANCHES", "prompt_tokens"]

BRANCHES = ("cond", "uncond", "both")
_MASS_VARS = ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass", "token_mass")


# ------------------------------------------------------------------------------------------------
# Which maps to record
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Tokens as the pipeline sees them
# ------------------------------------------------------------------------------------------------


def prompt_tokens(pipe: Any, prompt: str, n_txt: int, max_sequence_length: int) -> tuple[list[str], np.ndarray, list[str]]:
    """(token text, is-padding, source) for each of the ``n_txt`` text positions of ``prompt``.

    SD3/SD3.5: CLIP tokens (77, the CLIP-L tokenizer's view of the joined CLIP-L/G embedding)
    followed by T5 tokens. FLUX: T5 tokens only (CLIP gives just the pooled vector).
    """
    texts: list[str] = []
    padding: list[bool] = []
    source: list[str] = []

    def add(tokenizer: Any, length: int, name: str) -> None:
        if tokenizer is None:  # e.g. SD3 without T5: the pipeline feeds zeros there
            texts.extend([""] * length)
            padding.extend([True] * length)
        else:
            enc = tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                            add_special_tokens=True, return_attention_mask=True)
            ids = list(enc["input_ids"])[:length]
            texts.extend(tokenizer.convert_ids_to_tokens(ids))
            padding.extend(not bool(m) for m in list(enc["attention_mask"])[:length])
        source.extend([name] * length)

    if hasattr(pipe, "tokenizer_3"):  # SD3
        clip_len = int(getattr(pipe, "tokenizer_max_length", 77))
        add(pipe.tokenizer, clip_len, "clip")
        add(pipe.tokenizer_3, n_txt - clip_len, "t5")
    else:  # FLUX
        add(pipe.tokenizer_2, n_txt, "t5")
    if len(texts) != n_txt:
        raise TacaProbeError(f"tokenizers gave {len(texts)} text positions, the transformer saw {n_txt}")
    return texts, np.array(padding, dtype=bool), source


# ------------------------------------------------------------------------------------------------
# The recorder
# ------------------------------------------------------------------------------------------------


class _SampleBuffer:
    """One ``run.sample`` call (n images): device buffers filled call by call, host arrays filled
    from them once, when the pipeline returns (one device-to-host copy per sample, no sync per call).
    """

    def __init__(self, n: int, steps: int, sites: list[Site], heads: int, n_txt: int, branches: tuple[str, ...]):
        L = len(sites)
        nb = len(branches)
        self.values = {
            name: np.full((n, nb, steps, L, n_txt if name == "token_mass" else heads), np.nan, np.float32)
            for name in _MASS_VARS
        }
        self.timestep = np.full(steps, np.nan, np.float32)
        self.sigma = np.full(steps, np.nan, np.float32)
        self.gamma = np.full((steps, L), np.nan, np.float32)
        self.maps: dict[tuple[int, int, int], np.ndarray] = {}  # (branch, step, layer) -> (n, N_vis, n_sel)
        self.recorded = np.zeros((nb, steps), dtype=bool)
        # Filled on the device: per recorded call kind ("both" in one SD3 call, or one branch),
        # a (steps, layers, rows x (3 heads + n_txt)) fp32 tensor; maps as they come (pinned host
        # memory on CUDA, copied without blocking).
        self.device: dict[str, torch.Tensor] = {}
        self.device_maps: list[tuple[str, int, int, torch.Tensor]] = []  # (call kind, step, layer, (rows, N_vis, n_sel))


class Run:
    """What ``probe()`` yields: call :meth:`sample` to generate and record."""

    def __init__(self, pipe: Any, path: Path, handle: TacaHandle, *, maps: MapSelection | None, branch: str,
                 mode: str, attrs: dict[str, Any]):
        self.pipe, self.path, self.handle = pipe, path, handle
        self.maps, self.branch, self.mode = maps, branch, mode
        self.branches = ("cond", "uncond") if branch == "both" else (branch,)
        self.transformer = handle.transformer
        self.sites = handle.sites
        self.family = handle.family
        self.heads = int(self.transformer.config.num_attention_heads)
        self.attrs = attrs
        self.call_defaults: dict[str, Any] = {}
        self.writer: RunWriter | None = None
        if mode == "resume" and path.exists():
            self.writer = RunWriter.reopen(path)
        self._buffer: _SampleBuffer | None = None
        self._n_images = 1
        self._call_step = -1
        self._call_in_step = 0
        self._rows: slice | None = None
        self._observed = 0
        self._map_tokens: torch.Tensor | None = None
        self._map_token_idx: np.ndarray | None = None
        self._grid: tuple[int, int] | None = None
        self._n_txt: int | None = None
        self._max_seq: int | None = None
        self._hooks = [  # after the TACA handle's own pre-hook, on the same (outermost) module
            handle.hook_module.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            handle.hook_module.register_forward_hook(self._post_forward),
        ]

    # -- public --------------------------------------------------------------------------------
    def sample(self, prompt: str, *, seed: int = 0, num_images_per_prompt: int = 1, slot: int | None = None,
               **pipe_kwargs: Any) -> list:
        """Generate from ``prompt`` with ``torch.Generator('cpu').manual_seed(seed)`` and record.

        Other keyword arguments go to the pipeline unchanged. Returns the PIL images; in a resumed
        store, a prompt and seed that are already complete are skipped (returns ``[]``). ``slot``
        writes into a pre-allocated slot of the store (the CLI's planned runs, one image each).
        """
        if not isinstance(prompt, str) or not prompt:
            raise TacaProbeError("prompt must be a non-empty string")
        pipe_kwargs = self._resolve_call(pipe_kwargs)
        n = int(num_images_per_prompt)
        writer = self.writer  # O(1) look-ups: the writer keeps the slot table in memory
        if slot is not None:
            planned = writer.slot(slot) if writer is not None else None
            if n != 1 or planned is None or planned[:3] not in ((prompt, int(seed), 0), UNKNOWN_SLOT[:3]):
                raise StoreError(f"slot {slot} of {str(self.path)!r} is not planned for ({prompt!r}, seed {seed})")
            if planned[3]:
                return []
            first_slot = slot
        else:
            if writer is not None and all(writer.is_done((prompt, int(seed), b)) for b in range(n)):
                return []
            first_slot = writer.first_free() if writer is not None else 0
        self._n_images = n
        self._current_prompt, self._current_seed = prompt, int(seed)
        self._max_seq = int(pipe_kwargs.get("max_sequence_length", 256 if self.family == "sd3" else 512))
        self._buffer = None
        self._call_step = -1
        self.handle.calls.clear()
        out = self.pipe(prompt, generator=torch.Generator("cpu").manual_seed(int(seed)),
                        num_images_per_prompt=n, output_type="np", **pipe_kwargs)
        buf = self._buffer
        if buf is None:
            raise TacaProbeError("the pipeline never called the transformer; nothing was recorded")
        self._collect()
        missing = np.flatnonzero(~buf.recorded.all(axis=0))
        if missing.size:
            raise TacaProbeError(f"steps {missing.tolist()} were not recorded for branch(es) {self.branches}")
        images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)  # (n, H, W, 3), as diffusers' PIL
        self._write(prompt, int(seed), images, first_slot)
        from PIL import Image

        return [Image.fromarray(im) for im in images]

    def _resolve_call(self, pipe_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model's call defaults under ``pipe_kwargs``; the first sample's settings become the
        store's ``pipeline_kwargs`` and ``guidance`` (unless given, as the CLI gives them)."""
        call = {**self.call_defaults, **pipe_kwargs}
        plain = {k: v for k, v in call.items() if v is None or isinstance(v, (bool, int, float, str))}
        self.attrs.setdefault("pipeline_kwargs", plain)
        if "guidance" not in self.attrs:
            param = inspect.signature(self.pipe.__call__).parameters.get("guidance_scale")
            default = None if param is None or param.default is inspect.Parameter.empty else param.default
            self.attrs["guidance"] = call.get("guidance_scale", default)
        return call

    # -- hooks ---------------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.handle.current_call  # located by the TACA handle for this very call
        if call.step != self._call_step:
            self._call_step, self._call_in_step = call.step, 0
        else:
            self._call_in_step += 1
        bound = self.handle.current_arguments  # bound once per call by the TACA handle's pre-hook
        hidden = bound["hidden_states"]
        batch = hidden.shape[0]
        n = self._n_images
        self._rows = None
        branch = None
        if self.family == "sd3":
            if self._call_in_step == 0:
                if batch == 2 * n:
                    rows = {"cond": slice(n, 2 * n), "uncond": slice(0, n)}
                    self._rows = slice(0, 2 * n) if self.branch == "both" else rows[self.branch]
                    branch = self.branch
                elif batch == n and self.branch == "cond":
                    self._rows, branch = slice(0, n), "cond"
        else:
            which = {0: "cond", 1: "uncond"}.get(self._call_in_step)
            if which is not None and which in self.branches and batch == n:
                self._rows, branch = slice(0, n), which
        if self._rows is None:
            self.handle.state.observer = None
            return
        self._current_branch = branch
        n_txt = self.handle.state.n_txt
        if self._buffer is None:  # the first recorded call of this sample
            grid = self._latent_grid(hidden, bound)
            steps = call.num_steps or len(self.pipe.scheduler.timesteps)
            self._buffer = _SampleBuffer(n, steps, self.sites, self.heads, n_txt, self.branches)
            self._grid, self._n_txt = grid, n_txt
            if self.maps is not None:
                _, padding, _ = prompt_tokens(self.pipe, self._current_prompt, n_txt, self._max_seq)
                idx = self.maps.token_indices(padding)
                self._map_token_idx = idx
                self._map_tokens = torch.as_tensor(idx, dtype=torch.long, device=hidden.device)
        elif n_txt != self._n_txt:
            raise TacaProbeError("the text length changed within one sample")
        buf = self._buffer
        if branch not in buf.device:
            rows = self._rows.stop - self._rows.start
            width = rows * (3 * self.heads + n_txt)
            buf.device[branch] = torch.full((buf.timestep.shape[0], len(self.sites), width), float("nan"),
                                            dtype=torch.float32, device=hidden.device)
        self._observed = 0
        self.handle.state.observer = self._observe

    def _latent_grid(self, hidden: torch.Tensor, bound: dict) -> tuple[int, int]:
        """(rows, columns) of image tokens: SD3 from the latent's shape, FLUX from ``img_ids``."""
        if self.family == "sd3":
            p = self.transformer.config.patch_size
            return hidden.shape[-2] // p, hidden.shape[-1] // p
        ids = bound.get("img_ids")
        if ids is None:
            raise TacaProbeError("FLUX transformer called without img_ids; cannot tell the latent grid")
        ids = ids.reshape(-1, ids.shape[-1])
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1  # once a sample

    def _observe(self, site: Site, q, k, layout: JointLayout, gamma: float, scale, parts: dict) -> None:
        rows = self._rows
        sel = {key: (v[rows] if v is not None else None) for key, v in parts.items()}
        step, branch = self._call_step, self._current_branch
        want_map = self.maps is not None and self.maps.selects(step, site.name) and len(self._map_tokens)
        stats = attention_statistics(q[rows], k[rows], layout, gamma, sel, scale=scale,
                                     map_tokens=self._map_tokens if want_map else None)
        # (B, H) x 3 and (B, N_txt), into this (step, layer)'s row of the sample's device buffer
        torch.cat([stats[name].reshape(-1) for name in _MASS_VARS], out=self._buffer.device[branch][step, site.index])
        self._observed += 1
        if want_map:
            m = stats["maps"].to(torch.float16)
            if m.is_cuda:  # off the device without waiting: pinned memory, copied in stream order
                host = torch.empty(m.shape, dtype=m.dtype, pin_memory=True)
                host.copy_(m, non_blocking=True)
                m = host
            self._buffer.device_maps.append((branch, step, site.index, m))

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.handle.state.observer is None or self._rows is None:
            return
        self.handle.state.observer = None
        buf, step = self._buffer, self._call_step
        if self._observed != len(self.sites):
            raise TacaProbeError(f"recorded {self._observed} of {len(self.sites)} attention sites at step {step}")
        if self._current_branch == "both":
            buf.recorded[:, step] = True
        else:
            buf.recorded[self.branches.index(self._current_branch), step] = True
        call = self.handle.current_call
        buf.timestep[step] = call.t
        buf.sigma[step] = call.sigma if call.sigma is not None else call.t / 1000.0
        buf.gamma[step] = [self.handle.state.gammas.get(s.name, 1.0) for s in self.sites]

    def _collect(self) -> None:
        """Move the sample's statistics to the host: one copy per buffer, the sample's one sync."""
        buf = self._buffer
        L, H, T = len(self.sites), self.heads, self._n_txt
        for branch, dev in buf.device.items():
            host = dev.cpu().numpy()  # (steps, L, rows * (3H + T))
            steps_done = buf.recorded[0 if branch == "both" else self.branches.index(branch)]
            rows = host.shape[-1] // (3 * H + T)
            sizes = [rows * H, rows * H, rows * H, rows * T]
            offsets = np.cumsum([0] + sizes)
            for j, name in enumerate(_MASS_VARS):
                block = host[:, :, offsets[j] : offsets[j + 1]].reshape(host.shape[0], L, rows, -1)  # (steps, L, B, H|T)
                bad = ~np.isfinite(block) & steps_done[:, None, None, None]
                if bad.any():
                    step, li = (int(i) for i in np.argwhere(bad)[0][:2])
                    raise TacaProbeError(
                        f"non-finite {name} at sample {self._current_prompt!r} (seed {self._current_seed}), "
                        f"step {step}, layer {self.sites[li].name}"
                    )
                block = block.transpose(2, 0, 1, 3)  # (B, steps, L, H|T)
                if branch == "both":  # rows [uncond..., cond...]
                    n = rows // 2
                    buf.values[name][:, 0] = block[n:]
                    buf.values[name][:, 1] = block[:n]
                else:
                    buf.values[name][:, self.branches.index(branch)] = block
        if any(m.is_cuda or m.is_pinned() for *_, m in buf.device_maps):
            torch.cuda.synchronize()  # the non-blocking map copies have landed
        for branch, step, li, m in buf.device_maps:  # (B, N_vis, n_sel)
            m = m.numpy()
            if branch == "both":
                n = m.shape[0] // 2
                buf.maps[(0, step, li)] = m[n:]
                buf.maps[(1, step, li)] = m[:n]
            else:
                buf.maps[(self.branches.index(branch), step, li)] = m
        buf.device.clear()
        buf.device_maps.clear()

    # -- planning (the CLI, and distributed runs, create the whole store before sampling) -------
    def planned_layout(self, call: dict[str, Any]) -> RunLayout:
        """The layout the samples of ``pipe(**call)`` will have, computed without sampling."""
        pipe = self.pipe
        height, width = int(call["height"]), int(call["width"])
        # latent pixels per token side: VAE downsampling x patch size (SD3) or x 2 (FLUX packs 2x2)
        patch = int(self.transformer.config.patch_size) if self.family == "sd3" else 2
        scale = int(getattr(pipe, "vae_scale_factor", 8)) * patch
        if self.family == "sd3":
            max_seq = int(call.get("max_sequence_length", 256))
            n_txt = int(getattr(pipe, "tokenizer_max_length", 77)) + max_seq
        else:
            max_seq = int(call.get("max_sequence_length", 512))
            n_txt = max_seq
        _, _, sources = prompt_tokens(pipe, "", n_txt, max_seq)
        return RunLayout(
            steps=int(call["num_inference_steps"]), layers=tuple(s.name for s in self.sites),
            block_types=tuple(s.block_type for s in self.sites), heads=self.heads, n_txt=n_txt,
            grid=(height // scale, width // scale), image_shape=(height, width, 3), token_source=tuple(sources),
            branches=self.branches, maps=self.maps is not None,
        )

    def create_planned(self, plan: Sequence[tuple[str, int]], call: dict[str, Any]) -> None:
        """Create the store with one slot per (prompt, seed) of ``plan``, none complete yet."""
        layout = self.planned_layout(call)
        if self.maps is not None:
            self.maps.check(layout)  # before the store exists
        sample_attrs = {"steps": layout.steps, "height": layout.image_shape[0], "width": layout.image_shape[1],
                        "n_txt": layout.n_txt, "n_vis": layout.grid[0] * layout.grid[1],
                        "latent_grid": list(layout.grid)}
        self.writer = RunWriter.create(self.path, layout, {**self.attrs, **sample_attrs},
                                       slots=[(p, int(s), 0) for p, s in plan])

    def attach(self) -> None:
        """Open the store another process created (distributed runs)."""
        self.writer = RunWriter.reopen(self.path)

    # -- writing -------------------------------------------------------------------------------
    def _layout(self, images: np.ndarray) -> RunLayout:
        _, _, sources = prompt_tokens(self.pipe, "", self._n_txt, self._max_seq)
        return RunLayout(
            steps=self._buffer.timestep.shape[0], layers=tuple(s.name for s in self.sites),
            block_types=tuple(s.block_type for s in self.sites), heads=self.heads, n_txt=self._n_txt,
            grid=self._grid, image_shape=tuple(images.shape[1:]), token_source=tuple(sources),
            branches=self.branches, maps=self.maps is not None,
        )

    def _write(self, prompt: str, seed: int, images: np.ndarray, first_slot: int) -> None:
        buf = self._buffer
        layout = self._layout(images)
        sample_attrs = {"steps": layout.steps, "height": int(images.shape[1]), "width": int(images.shape[2]),
                        "n_txt": layout.n_txt, "n_vis": layout.grid[0] * layout.grid[1], "latent_grid": list(layout.grid)}
        created = False
        if self.writer is None:
            if self.maps is not None:
                self.maps.check(layout)
            self.writer = RunWriter.create(self.path, layout, {**self.attrs, **sample_attrs})
            created = True
        else:
            stored = self.writer.layout
            diffs = [f"{k}: store {getattr(stored, k)!r} vs now {getattr(layout, k)!r}"
                     for k in ("steps", "layers", "heads", "n_txt", "grid", "image_shape", "branches", "maps")
                     if getattr(stored, k) != getattr(layout, k)]
            if diffs:
                raise StoreError(f"sample does not fit the store {str(self.path)!r}: " + "; ".join(diffs))
        texts, padding, _ = prompt_tokens(self.pipe, prompt, layout.n_txt, self._max_seq)
        squeeze = layout.branch_dim == ()
        try:
            for b in range(images.shape[0]):
                slot = first_slot + b
                self.writer.reserve(slot)
                values = {
                    "prompt": prompt, "seed": seed, "batch_index": b,
                    "timestep": buf.timestep, "sigma": buf.sigma, "gamma": buf.gamma,
                    "token_text": np.array(texts, dtype=object), "token_is_padding": padding, "image": images[b],
                }
                for name in _MASS_VARS:
                    v = buf.values[name][b]
                    values[name] = v[0] if squeeze else v
                self.writer.write(slot, values)
                if self.maps is not None:
                    idx = self._map_token_idx
                    by_step: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
                    for (bi, step, li), m in buf.maps.items():
                        by_step.setdefault((bi, step), []).append((li, m))
                    for (bi, step), entries in sorted(by_step.items()):
                        # one shard: every layer of this step; unselected layers stay NaN (not stored)
                        block = np.full((len(layout.layers), layout.n_txt, *layout.grid), np.nan, np.float16)
                        for li, m in entries:
                            block[li, idx] = m[b].T.reshape(len(idx), *layout.grid)
                        self.writer.write_maps(slot, ((bi,) if not squeeze else ()) + (step,), block)
                self.writer.complete(slot)
        except BaseException:
            if created and not any(c for *_, c in self.writer.slots()):
                remove_store(self.path)  # a store with no finished sample is not left behind
                self.writer = None
            raise

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.handle.state.observer = None


@contextmanager
def probe(
    pipe: Any,
    path: str | os.PathLike,
    *,
    schedule: Schedule | str = "none",
    maps: MapSelection | str | None = None,
    branch: str = "cond",
    mode: str = "create",
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    attrs: dict[str, Any] | None = None,
    model: str | None = None,
) -> Iterator[Run]:
    """Record cross-modal attention into a zarr store while ``pipe`` samples.

    Parameters
    ----------
    pipe
        A ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or compatible).
    path
        Store folder (created on the first finished sample).
    schedule
        TACA schedule applied while recording (``"none"``: the stock model).
    maps
        Map selection (:class:`MapSelection` or its string form), or None for no maps.
    branch
        ``"cond"``, ``"uncond"`` or ``"both"`` (adds a ``branch`` dimension).
    mode
        ``"create"`` refuses an existing path; ``"resume"`` appends to it, skipping samples already
        complete; ``"overwrite"`` replaces it.
    lora, lora_scale
        As for :func:`taca_probe.taca`.
    attrs
        Extra provenance attributes.
    model
        The model's name as the user gave it (default: the pipeline's ``name_or_path``); stored and
        compared on resume.

    Yields
    ------
    Run
    """
    if branch not in BRANCHES:
        raise TacaProbeError(f"unknown branch {branch!r}; choose from {', '.join(BRANCHES)}")
    if mode not in ("create", "resume", "overwrite"):
        raise TacaProbeError(f"unknown mode {mode!r}; choose from create, resume, overwrite")
    schedule = parse(schedule)
    maps = MapSelection.parse(maps)
    p = Path(path)
    if mode == "create" and p.exists():
        raise StoreError(f"{str(p)!r} already exists; pass --resume to complete it or --overwrite to replace it")
    if p.exists() and not is_store(p):
        raise StoreError(f"{str(p)!r} exists and is not a taca-probe store; choose another path")
    handle = apply_taca(pipe, TacaConfig(schedule=schedule, lora=lora, lora_scale=lora_scale))
    run = None
    try:
        _check_schedule_layers(schedule, handle.sites)
        settings = run_settings(pipe, schedule=schedule, maps=maps, branch=branch, model=model)
        if mode == "resume" and p.exists():
            check_resume(p, settings)
        if mode == "overwrite":
            remove_store(p)
        import diffusers

        base_attrs = {
            **settings,
            "lora": None if lora is None else str(lora), "lora_scale": float(lora_scale),
            "planned_samples": None,  # a store planned up front (record, sweep) holds its slot count
            "taca_probe_version": __version__, "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
            "schedule_description": schedule.describe(),
            "device": str(handle.transformer.device),
            "stats_backend": describe_stats_backend(handle.transformer.device, handle.transformer.dtype),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(attrs or {}),
        }
        run = Run(pipe, p, handle, maps=maps, branch=branch, mode=mode, attrs=base_attrs)
        run.call_defaults = model_call_defaults(pipe)  # run.sample applies them, as the CLI does
        yield run
    finally:
        if run is not None:
            run.close()
        handle.remove()


def _check_schedule_layers(schedule: Schedule, sites: Sequence[Site]) -> None:
    """Refuse a restricted schedule that selects no attention layer of this model: the store would
    say TACA was applied when it was not."""
    if schedule.is_identity:
        return
    for pattern in getattr(schedule, "layers", None) or ():
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in sites):
            raise TacaProbeError(f"--schedule {schedule.spec!r}: layers={pattern} matches none of this model's "
                                 f"{len(sites)} attention layers ({sites[0].name} ... {sites[-1].name})")
    if hasattr(schedule, "selects") and not any(schedule.selects(layer=s.name, block_type=s.block_type)
                                                for s in sites):
        raise TacaProbeError(f"--schedule {schedule.spec!r} selects none of this model's attention layers")


def run_settings(pipe: Any, *, schedule: Schedule, maps: MapSelection | None, branch: str,
                 model: str | None = None) -> dict[str, Any]:
    """The settings a resumed run must share with its store."""
    transformer = pipe.transformer
    return {
        "model": str(model or model_name(pipe) or getattr(transformer.config, "_name_or_path", "")),
        "model_class": type(transformer).__name__,
        "pipeline_class": type(pipe).__name__,
        "dtype": str(transformer.dtype).removeprefix("torch."),
        "schedule": schedule.spec,
        "maps": None if maps is None else maps.spec,
        "map_selection": None if maps is None else maps.to_attrs(),
        "branch": branch,
    }


_RESUME_KEYS = ("model_class", "pipeline_class", "dtype", "schedule", "maps", "branch")


def check_resume(path: str | os.PathLike, settings: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Refuse to resume ``path`` with different settings, listing every difference."""
    stored = RunWriter.reopen(path).attrs
    want = {k: settings.get(k) for k in _RESUME_KEYS}
    if settings.get("model"):
        want["model"] = settings["model"]
    want.update(extra or {})
    diffs = [f"{k}: store has {stored.get(k)!r}, now {v!r}" for k, v in want.items() if k in stored and stored.get(k) != v]
    if diffs:
        raise StoreError(f"cannot resume {str(path)!r} with different settings: " + "; ".join(diffs))
