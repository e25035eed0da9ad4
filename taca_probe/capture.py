"""Capture: transformer calls -> CFG routing -> one in-memory :class:`Sample`. Knows no store.

A :class:`Recorder` listens to a TACA handle; each recorded attention call writes its statistics
(:func:`~taca_probe.attention.attention_statistics`) into a device buffer indexed by (step, layer),
and the sample crosses to the host once, when finished. Recorded calls (``branch``): SD3 batched
CFG, one call per step with rows ``[uncond..., cond...]``; FLUX, one call per step (``cond``) or
two with true CFG, cond then uncond. Further calls in a step (SD3 skip-layer guidance) are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from .attention import JointLayout, attention_statistics
from .errors import TacaProbeError
from .intervention import CallRecord, TacaHandle
from .processors import Site
from .selection import MapSelection
from .store import RunLayout

__all__ = ["BRANCHES", "MASS_VARS", "Recorder", "Sample", "image_bytes", "planned_steps", "prompt_tokens"]

BRANCHES = ("cond", "uncond", "both")
MASS_VARS = ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass", "token_mass")


def image_bytes(images: Any, prompt: str, seed: int) -> np.ndarray:
    """A pipeline's ``output_type="np"`` images, (n, H, W, 3) in 0..1, as uint8 (as diffusers' PIL).

    A NaN or inf value (the model overflowed, e.g. under a huge gamma) is a :class:`TacaProbeError`,
    checked before the cast, which would warn and give a black image.
    """
    images = np.asarray(images)
    bad = ~np.isfinite(images)
    if bad.any():
        raise TacaProbeError(f"non-finite image at sample {prompt!r} (seed {seed}): {int(bad.sum())} of {bad.size} "
                             "pixel values are NaN or inf (the model overflowed; try a smaller gamma); not written")
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def prompt_tokens(pipe: Any, prompt: str, n_txt: int, max_sequence_length: int,
                  t5_prompt: str | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(token text, is-padding, source) for each of the ``n_txt`` text positions of ``prompt``.

    SD3/SD3.5: CLIP tokens (77, the CLIP-L tokenizer's view of the joined CLIP-L/G embedding)
    followed by T5 tokens. FLUX: T5 tokens only (CLIP gives just the pooled vector). The T5 tokens
    are those of ``t5_prompt`` where given (the pipeline's ``prompt_3`` / FLUX's ``prompt_2``).
    """
    texts: list[str] = []
    padding: list[bool] = []
    source: list[str] = []

    def add(tokenizer: Any, length: int, name: str, text: str) -> None:
        if tokenizer is None:  # e.g. SD3 without T5: the pipeline feeds zeros there
            texts.extend([""] * length)
            padding.extend([True] * length)
        else:
            enc = tokenizer(text, padding="max_length", max_length=length, truncation=True,
                            add_special_tokens=True, return_attention_mask=True)
            texts.extend(tokenizer.convert_ids_to_tokens(list(enc["input_ids"])[:length]))
            padding.extend(not bool(m) for m in list(enc["attention_mask"])[:length])
        source.extend([name] * length)

    if hasattr(pipe, "tokenizer_3"):  # SD3
        clip_len = int(getattr(pipe, "tokenizer_max_length", 77))
        add(pipe.tokenizer, clip_len, "clip", prompt)
        add(pipe.tokenizer_3, n_txt - clip_len, "t5", t5_prompt or prompt)
    else:  # FLUX
        add(pipe.tokenizer_2, n_txt, "t5", t5_prompt or prompt)
    if len(texts) != n_txt:
        raise TacaProbeError(f"tokenizers gave {len(texts)} text positions, the transformer saw {n_txt}")
    return texts, np.array(padding, dtype=bool), source


def planned_steps(pipe: Any, num_inference_steps: int) -> int:
    """The passes of the pipeline's loop (a recording's steps) for ``num_inference_steps``: a
    second-order scheduler (Heun) evaluates twice per step but the first, ``2N - 1``."""
    order = int(getattr(pipe.scheduler, "order", 1))
    return order * int(num_inference_steps) - (order - 1)


def _family_text(pipe: Any, family: str, call: Mapping[str, Any]) -> tuple[int, int]:
    """(text tokens the transformer sees, T5 length) for a pipeline call."""
    max_seq = int(call.get("max_sequence_length", 256 if family == "sd3" else 512))
    return (int(getattr(pipe, "tokenizer_max_length", 77)) if family == "sd3" else 0) + max_seq, max_seq


@dataclass
class Sample:
    """One pipeline call's recording (``n`` images of one prompt and seed), in host memory.

    ``values[name]`` is (n, branch, step, layer, head|token) float32; ``maps[(branch, step)]`` holds
    (layer index, (n, N_vis, n_selected)) float16 pairs for the selected tokens ``map_tokens``.
    """

    prompt: str
    seed: int
    layout: RunLayout
    images: np.ndarray  # (n, H, W, 3) uint8
    timestep: np.ndarray  # (step,)
    sigma: np.ndarray  # (step,)
    gamma: np.ndarray  # (step, layer)
    token_text: list[str]
    token_is_padding: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    map_tokens: np.ndarray | None = None


class _Buffer:
    """One sample being recorded: per call kind ("both": one SD3 call holds both branches), a
    (steps, layers, rows x (3 heads + n_txt)) fp32 device tensor; maps as they come (pinned host
    memory on CUDA, copied without blocking)."""

    def __init__(self, steps: int, n_txt: int, grid: tuple[int, int], tokens: tuple, map_idx: np.ndarray | None,
                 map_tokens: torch.Tensor | None):
        self.steps, self.n_txt, self.grid = steps, n_txt, grid
        self.tokens, self.map_idx, self.map_tokens = tokens, map_idx, map_tokens
        self.timestep = np.full(steps, np.nan, np.float32)
        self.sigma = np.full(steps, np.nan, np.float32)
        self.gamma: list[Mapping[str, float] | None] = [None] * steps
        self.recorded: dict[str, set[int]] = {}  # call kind -> steps
        self.device: dict[str, torch.Tensor] = {}
        self.device_maps: list[tuple[str, int, int, torch.Tensor]] = []


class Recorder:
    """Turns the transformer calls of one pipeline call into a :class:`Sample`: ``begin`` before the
    pipeline call, ``finish`` after it (``cancel`` if it failed)."""

    def __init__(self, pipe: Any, handle: TacaHandle, *, maps: MapSelection | None, branch: str):
        if branch not in BRANCHES:
            raise TacaProbeError(f"unknown branch {branch!r}; choose from {', '.join(BRANCHES)}")
        self.pipe, self.handle, self.maps, self.branch = pipe, handle, maps, branch
        self.branches = ("cond", "uncond") if branch == "both" else (branch,)
        self.sites: list[Site] = handle.sites
        self.heads = int(handle.transformer.config.num_attention_heads)
        self._buf: _Buffer | None = None
        self._active = False
        self._remove = handle.listen(self._before, self._after)

    def close(self) -> None:
        self._remove()

    def planned_layout(self, call: Mapping[str, Any]) -> RunLayout:
        """The layout the samples of ``pipe(**call)`` will have, computed without sampling."""
        height, width = int(call["height"]), int(call["width"])
        # latent pixels per token side: VAE downsampling x patch size (SD3) or x 2 (FLUX packs 2x2)
        patch = int(self.handle.transformer.config.patch_size) if self.handle.family == "sd3" else 2
        scale = int(getattr(self.pipe, "vae_scale_factor", 8)) * patch
        n_txt, max_seq = _family_text(self.pipe, self.handle.family, call)
        _, _, sources = prompt_tokens(self.pipe, "", n_txt, max_seq)
        return self._layout(planned_steps(self.pipe, call["num_inference_steps"]), n_txt,
                            (height // scale, width // scale), (height, width, 3), sources)

    def _layout(self, steps: int, n_txt: int, grid: tuple, image_shape: tuple, sources: list[str]) -> RunLayout:
        return RunLayout(steps=steps, layers=tuple(s.name for s in self.sites),
                         block_types=tuple(s.block_type for s in self.sites), heads=self.heads, n_txt=n_txt,
                         grid=tuple(grid), image_shape=tuple(image_shape), token_source=tuple(sources),
                         branches=self.branches, maps=self.maps is not None)

    def begin(self, prompt: str, n_images: int, max_sequence_length: int | None, t5_prompt: str | None = None) -> None:
        self._prompt, self._n, self._max_seq, self._buf = prompt, int(n_images), max_sequence_length, None
        self._t5_prompt = t5_prompt
        self._step, self._in_step, self._active, self._calls = -1, 0, True, 0

    def cancel(self) -> None:
        self._active = False

    def finish(self, images: np.ndarray, seed: int) -> Sample:
        """The recorded sample of the pipeline's ``output_type="np"`` ``images``: one device-to-host copy
        per buffer (the sample's one sync); non-finite statistics, then images, are refused."""
        self._active = False
        buf = self._buf
        if buf is None and not self._calls:
            raise TacaProbeError("the pipeline never called the transformer; nothing was recorded")
        if "uncond" in self.branches and not (buf and (buf.recorded.get("uncond") or buf.recorded.get("both"))):
            # The transformer ran, but never on unconditional rows: the pipeline ran without CFG.
            sd3 = self.handle.family == "sd3"
            g = getattr(self.pipe, "guidance_scale", None) if sd3 else None  # the call's (SD3 keeps it)
            how = ("SD3 batches one only at guidance_scale > 1" + ("" if g is None else f", this call had {g:g}")
                   if sd3 else "FLUX calls one only with true_cfg_scale > 1 and a negative_prompt")
            raise TacaProbeError(f"the uncond branch was not recorded: the pipeline ran without CFG at this guidance, "
                                 f"so it made no unconditional call ({how}); record branch='cond' (--branch cond), "
                                 "or turn CFG on")
        if buf is None:
            raise TacaProbeError(f"no transformer call was recorded for branch(es) {self.branches}")
        for kind in ["both"] if "both" in buf.device else self.branches:  # "both": one SD3 call held both
            done = buf.recorded.get(kind, set())
            missing = sorted(set(range(buf.steps)) - done)
            if missing:
                # Part of the run happened: the loop started late (img2img) or stopped early, not a CFG matter.
                why = (f"; the pipeline ran only steps {min(done)}-{max(done)} (img2img strength < 1, or interrupted): "
                       "probe records whole runs" if done else "")
                raise TacaProbeError(f"steps {missing} were not recorded for branch(es) {self.branches}{why}")
        texts, padding, sources = buf.tokens
        layout = self._layout(buf.steps, buf.n_txt, buf.grid, images.shape[1:], sources)
        gamma = np.array([[g.get(s.name, 1.0) for s in self.sites] for g in buf.gamma], np.float32)
        sample = Sample(prompt=self._prompt, seed=int(seed), layout=layout, images=images, timestep=buf.timestep,
                        sigma=buf.sigma, gamma=gamma, token_text=texts, token_is_padding=padding,
                        map_tokens=buf.map_idx)
        self._collect(buf, sample)  # names the first step and layer that overflowed
        sample.images = image_bytes(images, self._prompt, seed)
        return sample

    def _before(self, call: CallRecord, bound: Mapping[str, Any]):
        if not self._active:
            return None
        self._calls += 1
        self._in_step = self._in_step + 1 if call.step == self._step else 0
        self._step = call.step
        hidden = bound["hidden_states"]
        batch, n = hidden.shape[0], self._n
        rows = kind = None
        if self.handle.family == "sd3":
            if self._in_step == 0 and batch == 2 * n:  # batched CFG: [uncond..., cond...]
                rows = {"both": slice(0, 2 * n), "cond": slice(n, 2 * n), "uncond": slice(0, n)}[self.branch]
                kind = self.branch
            elif self._in_step == 0 and batch == n and self.branch == "cond":
                rows, kind = slice(0, n), "cond"
        else:
            which = {0: "cond", 1: "uncond"}.get(self._in_step)
            if which is not None and which in self.branches and batch == n:
                rows, kind = slice(0, n), which
        if rows is None:
            return None
        n_txt = call.n_txt
        if self._buf is None:  # the first recorded call of this sample: tokenize, once
            steps = call.num_steps or len(self.pipe.scheduler.timesteps)
            max_seq = self._max_seq or _family_text(self.pipe, self.handle.family, {})[1]
            tokens = prompt_tokens(self.pipe, self._prompt, n_txt, max_seq, self._t5_prompt)
            idx = None if self.maps is None else self.maps.token_indices(tokens[1])
            self._buf = _Buffer(steps, n_txt, self._latent_grid(hidden, bound), tokens, idx,
                                None if idx is None else torch.as_tensor(idx, dtype=torch.long, device=hidden.device))
        elif n_txt != self._buf.n_txt:
            raise TacaProbeError("the text length changed within one sample")
        buf = self._buf
        if kind not in buf.device:
            width = (rows.stop - rows.start) * (3 * self.heads + n_txt)
            buf.device[kind] = torch.full((buf.steps, len(self.sites), width), float("nan"), dtype=torch.float32,
                                          device=hidden.device)
        self._rows, self._kind, self._observed = rows, kind, 0
        return self._observe

    def _after(self, call: CallRecord) -> None:
        if not self._active or self._buf is None or self._rows is None:
            return
        buf, step = self._buf, call.step
        self._rows = None
        if self._observed != len(self.sites):
            raise TacaProbeError(f"recorded {self._observed} of {len(self.sites)} attention sites at step {step}")
        buf.recorded.setdefault(self._kind, set()).add(step)
        buf.timestep[step] = call.t
        buf.sigma[step] = call.sigma if call.sigma is not None else call.t / 1000.0
        buf.gamma[step] = call.gammas

    def _latent_grid(self, hidden: torch.Tensor, bound: Mapping[str, Any]) -> tuple[int, int]:
        """(rows, columns) of image tokens: SD3 from the latent's shape, FLUX from ``img_ids``."""
        if self.handle.family == "sd3":
            p = self.handle.transformer.config.patch_size
            return hidden.shape[-2] // p, hidden.shape[-1] // p
        ids = bound.get("img_ids")
        if ids is None:
            raise TacaProbeError("FLUX transformer called without img_ids; cannot tell the latent grid")
        ids = ids.reshape(-1, ids.shape[-1])
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1  # once a sample

    def _observe(self, site: Site, q, k, layout: JointLayout, gamma: float, scale, parts: dict) -> None:
        rows, buf, step = self._rows, self._buf, self._step
        sel = {key: (v[rows] if v is not None else None) for key, v in parts.items()}
        want_map = self.maps is not None and self.maps.selects(step, site.name) and len(buf.map_idx)
        stats = attention_statistics(q[rows], k[rows], layout, gamma, sel, scale=scale,
                                     map_tokens=buf.map_tokens if want_map else None)
        # (B, H) x 3 and (B, N_txt), into this (step, layer)'s row of the sample's device buffer
        torch.cat([stats[name].reshape(-1) for name in MASS_VARS], out=buf.device[self._kind][step, site.index])
        self._observed += 1
        if want_map:
            m = stats["maps"].to(torch.float16)
            if m.is_cuda:  # off the device without waiting: pinned memory, copied in stream order
                m = torch.empty(m.shape, dtype=m.dtype, pin_memory=True).copy_(m, non_blocking=True)
            buf.device_maps.append((self._kind, step, site.index, m))

    def _collect(self, buf: _Buffer, sample: Sample) -> None:
        L, H, T, n = len(self.sites), self.heads, buf.n_txt, self._n
        values = {name: np.full((n, len(self.branches), buf.steps, L, T if name == "token_mass" else H), np.nan,
                                np.float32) for name in MASS_VARS}
        for kind, dev in buf.device.items():
            host = dev.cpu().numpy()  # (steps, L, rows * (3H + T))
            rows = host.shape[-1] // (3 * H + T)
            offsets = np.cumsum([0, rows * H, rows * H, rows * H, rows * T])
            for j, name in enumerate(MASS_VARS):
                block = host[:, :, offsets[j]:offsets[j + 1]].reshape(buf.steps, L, rows, -1)  # (steps, L, B, H|T)
                bad = ~np.isfinite(block)
                if bad.any():
                    step, li = (int(i) for i in np.argwhere(bad)[0][:2])
                    raise TacaProbeError(f"non-finite {name} at sample {sample.prompt!r} (seed {sample.seed}), "
                                         f"step {step}, layer {self.sites[li].name}")
                block = block.transpose(2, 0, 1, 3)  # (B, steps, L, H|T)
                if kind == "both":  # rows [uncond..., cond...]
                    values[name][:, 0], values[name][:, 1] = block[n:], block[:n]
                else:
                    values[name][:, self.branches.index(kind)] = block
        sample.values = values
        if any(m.is_pinned() for *_, m in buf.device_maps):
            torch.cuda.synchronize()  # the non-blocking map copies have landed
        for kind, step, li, m in buf.device_maps:  # (B, N_vis, n_sel)
            m = m.numpy()
            parts = [(0, m[n:]), (1, m[:n])] if kind == "both" else [(self.branches.index(kind), m)]
            for bi, part in parts:
                sample.maps.setdefault((bi, step), []).append((li, part))
