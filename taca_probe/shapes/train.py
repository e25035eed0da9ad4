"""Train the ``shapes`` model: a tiny Stable Diffusion 3 pipeline on the procedural shapes data.

``python -m taca_probe.shapes.train --out DIR [--steps N] [--minutes M] [--resume]``: seeded (step k's
batch is a pure function of ``(seed, k)``), resumable from ``DIR/checkpoint.pt``; exports the EMA weights
as a diffusers folder ``DIR/pipeline`` with ``call_defaults.json`` and ``manifest.json``. The VAE is a
one-level ``AutoencoderKL`` trained to the identity, so the diffusion runs in pixel space (README: the
architecture and recipe).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TacaProbeError, first_line
from ..logs import quiet
from ..selection import MAX_INT, is_seed

with quiet():  # importing the pipeline classes logs torchvision fallbacks of image processors SD3 never uses
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from . import dataset as ds
from .tokenizers import clip_tokenizer, t5_tokenizer

__all__ = ["TrainConfig", "TrainError", "build_pipeline", "export_pipeline", "main", "train"]

#: The architecture settings the command line sets (a resumed run keeps its checkpoint's).
_ARCHITECTURE = ("num_layers", "num_heads", "head_dim", "clip_hidden", "clip_layers", "t5_dim", "t5_layers")
#: The other settings with a flag of their own name.
_FLAGS = ("seed", "batch_size", "lr", "warmup_steps", "min_lr_fraction", "ema_decay", "guidance_scale",
          "checkpoint_minutes")
_MODULES = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
_CHECKPOINT_KEYS = ("config", "modules", "opt", "vae_opt", "ema", "state", "torch_rng")


class TrainError(TacaProbeError):
    """Bad training arguments, or a checkpoint that cannot be resumed."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the checkpoint and manifest)."""

    seed: int = 0
    steps: int = 5000  # length of the learning-rate schedule; --minutes may stop earlier
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    min_lr_fraction: float = 0.1  # the cosine decays to this fraction of lr
    # Warm start: a pipeline folder (e.g. an earlier export) whose weights start this run instead
    # of a fresh initialisation; its architecture must be this config's. The VAE is taken as is.
    init_from: str | None = None
    cfg_dropout: float = 0.1  # caption -> "" (the pipeline's negative prompt) for CFG
    shift: float = 3.0  # timestep shift, as SD3 and the scheduler below
    logit_normal_fraction: float = 0.5  # rest of the sigmas are uniform (mixed sampling)
    bf16: bool = True  # autocast on the CPU (AVX512-BF16) or GPU
    num_layers: int = 6
    num_heads: int = 3
    head_dim: int = 32
    patch_size: int = 4
    clip_hidden: int = 32
    clip_layers: int = 2
    t5_dim: int = 64
    t5_layers: int = 2
    clip_length: int = 16  # CLIP tokenizer model_max_length (SD3: 77)
    t5_length: int = 16  # max_sequence_length to call the pipeline with (SD3 default: 256)
    vae_channels: int = 16
    vae_steps: int = 200  # identity pre-training of the one-level VAE
    vae_batch_size: int = 8
    vae_lr: float = 2e-3
    # Recommended sampling settings (exported to call_defaults.json)
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    log_every: int = 100
    checkpoint_minutes: float = 5.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from a (possibly older) dict; unknown keys are an error."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainError(f"unknown training setting(s) in checkpoint: {', '.join(unknown)}")
        return cls(**data)


def build_pipeline(config: TrainConfig) -> Any:
    """A freshly initialised (seeded) ``StableDiffusion3Pipeline`` of the given architecture.

    Parameters
    ----------
    config : TrainConfig
        Architecture and seed.

    Returns
    -------
    diffusers.StableDiffusion3Pipeline
        On the CPU, float32, modules in eval mode.
    """
    if 2 * config.clip_hidden > config.t5_dim:
        # SD3 zero-pads the joined CLIP features to the T5 width.
        raise TrainError(f"2 * clip_hidden ({2 * config.clip_hidden}) must be <= t5_dim ({config.t5_dim})")
    width = config.num_heads * config.head_dim
    for wrong, need in (  # what the modules below need; their own errors are tracebacks
        (config.clip_hidden % 2, f"clip_hidden ({config.clip_hidden}) must be even: CLIP has 2 heads"),
        (config.t5_dim < 16, f"t5_dim ({config.t5_dim}) must be >= 16: T5 heads have 16 dims"),
        (width % 4, f"num_heads * head_dim ({width}) must be a multiple of 4 (2-D sin-cos position embedding)"),
    ):
        if wrong:
            raise TrainError(need)
    if ds.IMAGE_SIZE % config.patch_size:
        raise TrainError(f"patch_size {config.patch_size} must divide the image size {ds.IMAGE_SIZE}")
    clip_tok = clip_tokenizer(config.clip_length)
    t5_tok = t5_tokenizer(config.t5_length)
    torch.manual_seed(config.seed)

    def clip(act: str) -> Any:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=config.clip_hidden, intermediate_size=4 * config.clip_hidden,
            projection_dim=config.clip_hidden, num_hidden_layers=config.clip_layers, num_attention_heads=2,
            max_position_embeddings=config.clip_length, hidden_act=act, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,  # pooling reads the first EOS
            pad_token_id=clip_tok.pad_token_id,
        ))

    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=config.t5_dim, d_kv=16, d_ff=2 * config.t5_dim, num_layers=config.t5_layers,
        num_heads=config.t5_dim // 16, relative_attention_num_buckets=16, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    transformer = SD3Transformer2DModel(
        sample_size=ds.IMAGE_SIZE,  # latent size = pixel size (VAE scale factor 1): 64 px default
        patch_size=config.patch_size, in_channels=3, out_channels=3, num_layers=config.num_layers,
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, joint_attention_dim=config.t5_dim,
        caption_projection_dim=config.num_heads * config.head_dim, pooled_projection_dim=2 * config.clip_hidden,
        pos_embed_max_size=ds.IMAGE_SIZE // config.patch_size,
        qk_norm="rms_norm",  # SD3.5-style; keeps attention logits bounded at lr 1e-3
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(config.vae_channels,), layers_per_block=1, norm_num_groups=8, latent_channels=3,
        sample_size=ds.IMAGE_SIZE,
        mid_block_add_attention=False,  # 4096-token attention would dominate the cost
        use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.0, shift_factor=0.0,  # latents are pixels in [-1, 1]
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift),
        text_encoder=clip("quick_gelu"), tokenizer=clip_tok, text_encoder_2=clip("gelu"), tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok,
    )
    for name in _MODULES:
        getattr(pipe, name).eval()
    return pipe


def _init_from(pipe: Any, folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Load every trained module of ``pipe`` from a pipeline folder; returns a summary of the source."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise TrainError(f"--init-from {folder}: not a pipeline folder (no model_index.json)")
    with quiet():
        src = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    for name in _MODULES:
        try:
            getattr(pipe, name).load_state_dict(getattr(src, name).state_dict())
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise TrainError(f"--init-from {folder}: its {name} does not fit this architecture ({first})") from None
    summary: dict[str, Any] = {"path": str(folder)}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        summary.update({k: m.get(k) for k in ("steps_done", "train_wall_s", "final_loss_ema")})
        summary["source_total_steps"] = m.get("total_steps", m.get("steps_done"))
        summary["source_total_wall_s"] = m.get("total_wall_s", m.get("train_wall_s"))
    return summary


def _text_and_transformer(pipe: Any) -> list[torch.nn.Module]:
    return [getattr(pipe, name) for name in _MODULES[:-1]]


def call_defaults(config: TrainConfig) -> dict[str, Any]:
    """The recommended ``pipe(...)`` arguments for a model trained with ``config``."""
    # max_sequence_length: the pipeline default (256) would append 240 T5 padding tokens never seen in training.
    return {"height": ds.IMAGE_SIZE, "width": ds.IMAGE_SIZE, "num_inference_steps": config.num_inference_steps,
            "guidance_scale": config.guidance_scale, "max_sequence_length": config.t5_length}


def _sigmas(rng: np.random.Generator, n: int, config: TrainConfig) -> np.ndarray:
    # Mixed sampling: logit-normal concentrates on mid noise levels, the uniform part keeps the
    # extremes (sigma near 1 is where TACA acts) trained; then SD3's shift, as at inference.
    u = rng.uniform(size=n)
    logit = 1 / (1 + np.exp(-rng.normal(size=n)))
    u = np.where(rng.uniform(size=n) < config.logit_normal_fraction, logit, u)
    return (config.shift * u / (1 + (config.shift - 1) * u)).astype(np.float32)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    # Cosine decay to min_lr_fraction over the scheduled steps.
    frac = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    floor = config.min_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def training_batch(config: TrainConfig, k: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Step ``k``'s batch, a pure function of ``(config.seed, k)``: pixels, captions, sigmas, noise.

    Captions are dropped to ``""`` (the negative prompt) with probability ``cfg_dropout``. Runs in the data workers.
    """
    images, captions = ds.sample_batch((config.seed, 0, k), config.batch_size)
    rng = np.random.default_rng((config.seed, 2, k))
    drop = rng.uniform(size=len(captions)) < config.cfg_dropout
    captions = ["" if d else c for c, d in zip(captions, drop)]
    s = _sigmas(rng, len(captions), config)
    x0 = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0
    return x0, captions, s, rng.standard_normal(x0.shape).astype(np.float32)


def diffusion_loss(pipe: Any, batch: tuple[np.ndarray, list[str], np.ndarray, np.ndarray], config: TrainConfig,
                   device: torch.device) -> torch.Tensor:
    """Flow-matching loss of one :func:`training_batch`: ``x_t = (1 - s) x0 + s noise``, predict
    ``noise - x0`` at timestep ``1000 s`` (what ``FlowMatchEulerDiscreteScheduler`` integrates)."""
    x0, captions, s, noise = (torch.from_numpy(a).to(device) if isinstance(a, np.ndarray) else a for a in batch)
    x_t = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=config.t5_length,
        )
        pred = pipe.transformer(hidden_states=x_t, timestep=s * 1000, encoder_hidden_states=prompt_embeds,
                                pooled_projections=pooled, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), noise - x0)


class _Batches:
    """Training batches ``k, k+1, ...`` in order, made ahead by ``workers`` forked processes (0: inline)."""

    def __init__(self, config: TrainConfig, start: int, workers: int):
        self.config, self.next, self.pending = config, start, collections.deque()
        self.pool = multiprocessing.get_context("fork").Pool(workers) if workers else None
        self.depth = 2 * workers

    def get(self) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        if self.pool is None:
            self.next += 1
            return training_batch(self.config, self.next - 1)
        while len(self.pending) < self.depth:
            self.pending.append(self.pool.apply_async(training_batch, (self.config, self.next)))
            self.next += 1
        return self.pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def _vae_loss(vae: Any, images: np.ndarray, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    # Identity on a neighbourhood of the data: the decoder also sees slightly perturbed pixels,
    # as the transformer's outputs are never exactly on the data.
    # Channels-last strides kept (a contiguous copy, as in training_batch, changes the conv numerics).
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    z = (x + 0.05 * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))).clamp(-1.1, 1.1).to(device)
    x = x.to(device)
    dist = vae.encode(x).latent_dist
    return (
        torch.nn.functional.mse_loss(vae.decode(z).sample, z)
        + torch.nn.functional.mse_loss(dist.mean, x)
        + 1e-3 * torch.nn.functional.mse_loss(dist.logvar, torch.full_like(dist.logvar, -9.0))
    )


class _Ema:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm-up of the decay so early EMA weights are not dominated by the random init.
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)


def _load_checkpoint(pipe: Any, ema: _Ema, payload: dict[str, Any]) -> None:
    for name in _MODULES:
        getattr(pipe, name).load_state_dict(payload["modules"][name])
    for s, v in zip(ema.shadow, payload["ema"], strict=True):
        s.copy_(v)


def export_pipeline(pipe: Any, ema: _Ema | None, folder: Path, config: TrainConfig, state: dict[str, Any]) -> Path:
    """Save the (EMA) pipeline as a diffusers folder with call_defaults.json and manifest.json.

    Weights are stored in float16 (half the size; loading upcasts to the requested dtype).
    """
    folder = Path(folder)
    export = copy.deepcopy(pipe)
    if ema is not None:  # the EMA weights, into the copy
        with torch.no_grad():
            torch._foreach_copy_([p for m in _text_and_transformer(export) for p in m.parameters()], ema.shadow)
    with quiet():  # diffusers' "cast with to()" and progress-bar chatter
        export.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    for path in folder.rglob("*"):
        # The safetensors writer makes owner-only files; these are ordinary package data.
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    (folder / "call_defaults.json").write_text(json.dumps(call_defaults(config), indent=2) + "\n")
    init = state.get("init") or {}
    manifest = {
        "model": "shapes",
        "description": "tiny StableDiffusion3Pipeline trained on the procedural shapes dataset (taca_probe.shapes)",
        "training": asdict(config),
        "steps_done": state["step"],
        "vae_steps_done": state["vae_step"],
        "train_wall_s": round(state["elapsed"], 1),
        "init": state.get("init"),
        # Including the run this one was warm-started from (if any).
        "total_steps": state["step"] + int(init.get("source_total_steps") or 0),
        "total_wall_s": round(state["elapsed"] + float(init.get("source_total_wall_s") or 0), 1),
        "final_loss_ema": state.get("loss_ema"),
        "loss_log": state.get("loss_log", []),
        "parameters": {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in _MODULES},
        "tokens": {"image": (ds.IMAGE_SIZE // config.patch_size) ** 2, "text": config.clip_length + config.t5_length},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "device": state.get("device", "cpu")},
        "scores": {},
    }
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():  # keep evaluator scores recorded earlier
        manifest["scores"] = json.loads(manifest_path.read_text()).get("scores", {})
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def train(
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    minutes: float | None = None,
    resume: bool = False,
    steps: int | None = None,
    export: bool = True,
    device: str | torch.device = "cpu",
    workers: int = 0,
    fit_steps: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or resume training) and export the pipeline.

    Parameters
    ----------
    config : TrainConfig
        Settings of a new run; when resuming, the checkpoint's are used, except ``steps``, which
        may be raised to continue a finished run.
    out : path
        Output folder: ``checkpoint.pt``, ``train.log`` and ``pipeline/``.
    minutes : float, optional
        Wall-time budget in total (counting time before a resume); the run then stops early,
        checkpoints and exports (the manifest says how long it ran).
    resume : bool
        Continue from ``out/checkpoint.pt``.
    steps : int, optional
        When resuming: the new schedule length, shorter or longer (the cosine is re-read against it
        from the current step). Default: the checkpoint's, raised to ``config.steps`` if larger.
    export : bool
        Write ``out/pipeline`` at the end.
    device : str or torch.device
        Where to train; the export is float16 and CPU-loadable either way.
    workers : int
        Processes making batches ahead (0: in the training loop).
    fit_steps : bool
        With ``minutes``: after 100 steps, set the schedule length from the measured rate so that
        the cosine ends with the budget (recorded as ``steps`` in the manifest).
    log : callable
        Receives progress lines.

    Returns
    -------
    dict
        ``step``, ``vae_step``, ``elapsed`` (s), ``loss_log`` ([step, mean loss] pairs), ``losses``
        (every step's loss of this call), ``pipeline`` (the export folder or None).

    Raises
    ------
    TrainError
        If resuming without a checkpoint, or the checkpoint cannot be read.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    payload = None
    if resume:
        payload = _read_checkpoint(ckpt_path)
        new_steps = config.steps
        config = TrainConfig.from_dict(payload["config"])
        config.steps = max(config.steps, new_steps) if steps is None else steps
    elif ckpt_path.exists():
        raise TrainError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    if fit_steps and minutes is None:
        raise TrainError("fitting the schedule to the time budget needs --minutes")
    device = torch.device(device)
    pipe = build_pipeline(config)
    init_summary = None
    if config.init_from is not None and payload is None:
        init_summary = _init_from(pipe, config.init_from)
        log(f"initialised from {config.init_from} ({init_summary.get('source_total_steps')} steps before)")
    state_step = 0 if payload is None else int(payload["state"]["step"])
    batches = _Batches(config, state_step, workers)  # forks before CUDA is initialised
    pipe.to(device)
    trained = _text_and_transformer(pipe)
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    vae_opt = torch.optim.AdamW(pipe.vae.parameters(), lr=config.vae_lr)
    ema = _Ema(trained, config.ema_decay)
    state: dict[str, Any] = {"step": 0, "vae_step": 0, "elapsed": 0.0, "loss_log": [], "loss_ema": None}
    if init_summary is not None:
        state["vae_step"] = config.vae_steps  # the VAE comes trained with the initial weights
        state["init"] = init_summary
    if payload is not None:
        try:
            _load_checkpoint(pipe, ema, payload)
            opt.load_state_dict(payload["opt"])
            vae_opt.load_state_dict(payload["vae_opt"])
            state = payload["state"]
            torch.set_rng_state(payload["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise TrainError(f"cannot resume from {ckpt_path}: it does not fit this trainer "
                             f"({first_line(exc)})") from None
        log(f"resumed at step {state['step']} (vae {state['vae_step']}), {state['elapsed'] / 60:.1f} min done")

    state["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    budget = math.inf if minutes is None else minutes * 60.0
    start = time.perf_counter() - state["elapsed"]
    last_ckpt = time.perf_counter()
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses not yet read back (one device sync per log window)

    def elapsed() -> float:
        return time.perf_counter() - start

    def checkpoint() -> None:
        state["elapsed"] = elapsed()
        ckpt = {"config": asdict(config), "modules": {name: getattr(pipe, name).state_dict() for name in _MODULES},
                   "opt": opt.state_dict(), "vae_opt": vae_opt.state_dict(), "ema": ema.shadow, "state": state,
                   "torch_rng": torch.get_rng_state()}
        torch.save(ckpt, ckpt_path.with_suffix(".tmp"))
        os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)  # never leave a half-written checkpoint

    def read_losses() -> list[float]:
        window = torch.stack(pending).float().tolist() if pending else []
        pending.clear()
        for value in window:
            losses.append(value)
            state["loss_ema"] = value if state["loss_ema"] is None else 0.98 * state["loss_ema"] + 0.02 * value
        return window

    # Phase 1: the VAE to the identity (independent of the text and the transformer).
    pipe.vae.train()
    while state["vae_step"] < config.vae_steps and elapsed() < budget:
        k = state["vae_step"]
        rng = np.random.default_rng((config.seed, 1, k))
        images, _ = ds.sample_batch((config.seed, 1, k), config.vae_batch_size)
        loss = _vae_loss(pipe.vae, images, rng, device)
        vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        vae_opt.step()
        state["vae_step"] += 1
        if state["vae_step"] % config.log_every == 0 or state["vae_step"] == config.vae_steps:
            log(f"vae step {state['vae_step']}/{config.vae_steps} loss {loss.item():.5f} ({elapsed() / 60:.1f} min)")
    pipe.vae.eval()

    # Phase 2: transformer and text encoders, flow matching.
    for m in trained:
        m.train()
    t_window = time.perf_counter()
    # fit_steps: time steps [first + 50, first + 100) (the first ones warm up the allocator and kernels).
    fit_from = state["step"] + 50 if fit_steps else None
    try:
        while state["step"] < config.steps and elapsed() < budget:
            k = state["step"]
            if fit_from is not None and k in (fit_from, fit_from + 50):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if k == fit_from:
                    t_fit = time.perf_counter()
                else:
                    rate = 50 / (time.perf_counter() - t_fit)
                    config.steps = max(k + 1, config.warmup_steps + 1, k + int(0.97 * rate * (budget - elapsed())))
                    log(f"{rate:.2f} it/s: schedule fitted to the time budget, {config.steps} steps")
            for group in opt.param_groups:
                group["lr"] = config.lr * _lr_factor(k, config)
            loss = diffusion_loss(pipe, batches.get(), config, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            ema.update(k)
            state["step"] += 1
            pending.append(loss.detach())
            if state["step"] % config.log_every == 0 or state["step"] == config.steps:
                window = read_losses()
                rate = len(window) / (time.perf_counter() - t_window)
                state["loss_log"].append([state["step"], round(float(np.mean(window)), 5)])
                log(
                    f"step {state['step']}/{config.steps} loss {np.mean(window):.4f} (ema {state['loss_ema']:.4f}) "
                    f"lr {opt.param_groups[0]['lr']:.2e} {rate:.2f} it/s {elapsed() / 60:.1f} min"
                )
                t_window = time.perf_counter()
            if time.perf_counter() - last_ckpt > config.checkpoint_minutes * 60:
                checkpoint()
                last_ckpt = time.perf_counter()
    finally:
        batches.close()
    read_losses()  # the steps after the last log line
    for m in trained:
        m.eval()
    checkpoint()
    folder = None
    if export:
        folder = export_pipeline(pipe, ema, out / "pipeline", config, state)
        log(f"exported {folder} after {state['step']} steps, {state['elapsed'] / 60:.1f} min")
    return {**state, "losses": losses, "pipeline": folder}


def _read_checkpoint(ckpt_path: Path) -> dict[str, Any]:
    """The payload of a checkpoint of this trainer; a one-line :class:`TrainError` if missing or not one."""
    if not ckpt_path.is_file():
        raise TrainError(f"no checkpoint at {ckpt_path}")
    try:  # weights_only: a checkpoint is data; never run code that a file brings along
        payload = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise TrainError(f"cannot read checkpoint {ckpt_path}: {first_line(exc)}") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing or not isinstance(payload["config"], dict):
        raise TrainError(f"{ckpt_path} is not a checkpoint of this trainer (missing or bad: "
                         f"{', '.join(missing) or 'config'})")
    return payload


def export_checkpoint(out: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Export the EMA weights of ``out/checkpoint.pt`` to ``folder`` without training.

    For looking at a run while it trains (the checkpoint is replaced atomically, so that is safe).
    """
    payload = _read_checkpoint(Path(out) / "checkpoint.pt")
    config = TrainConfig.from_dict(payload["config"])
    pipe = build_pipeline(config)
    ema = _Ema(_text_and_transformer(pipe), config.ema_decay)
    _load_checkpoint(pipe, ema, payload)
    return export_pipeline(pipe, ema, Path(folder), config, payload["state"])


def main(argv: list[str] | None = None) -> int:
    """``python -m taca_probe.shapes.train``: train the shapes model (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m taca_probe.shapes.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (checkpoint.pt, train.log, pipeline/)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-time budget in minutes (total, across resumes)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (learning-rate schedule length; default {TrainConfig.steps}; "
                        "with --resume: the new schedule length, default the checkpoint's)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default cpu)")
    parser.add_argument("--workers", type=int, default=0, help="processes making batches ahead (default 0: inline)")
    parser.add_argument("--fit-steps", action="store_true", help="with --minutes: after 100 steps, fit the "
                        "schedule length to the budget from the measured rate")
    parser.add_argument("--checkpoint-minutes", type=float, default=TrainConfig.checkpoint_minutes)
    arch = parser.add_argument_group("architecture (new runs)")
    for name in _ARCHITECTURE:
        arch.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(TrainConfig, name))
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--export-only", metavar="DIR", default=None,
                        help="export OUT/checkpoint.pt's EMA weights to DIR and exit (no training)")
    parser.add_argument("--init-from", default=None,
                        help="warm start from this pipeline folder's weights (same architecture)")
    helps = {"lr": "peak learning rate", "guidance_scale": "CFG scale recorded in call_defaults.json"}
    for name in ("lr", "warmup_steps", "min_lr_fraction", "ema_decay", "guidance_scale"):
        default = getattr(TrainConfig, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=helps.get(name))
    args = parser.parse_args(argv)
    try:
        _run(args)
    except TacaProbeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    """:func:`main` once the arguments are parsed; bad ones raise :class:`TrainError`."""
    positive = {"steps": args.steps, "batch_size": args.batch_size, "threads": args.threads, "minutes": args.minutes,
                "checkpoint_minutes": args.checkpoint_minutes, **{n: getattr(args, n) for n in _ARCHITECTURE}}
    # nan and inf pass a "<= 0" test: nan minutes trained nothing, inf crashed --fit-steps with a traceback
    bad = [f"--{n.replace('_', '-')} must be positive and finite" for n, v in positive.items()
           if v is not None and not 0 < v < math.inf]
    bad += ["--workers must be >= 0"] * (args.workers < 0) + [f"--seed must be in 0..{MAX_INT}"] * (not is_seed(args.seed))
    if bad:
        raise TrainError(bad[0])
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available here")
    except RuntimeError as exc:
        raise TrainError(f"--device {args.device}: {first_line(exc)}") from None
    if not (0 < args.lr < math.inf and args.warmup_steps >= 1 and 0 <= args.min_lr_fraction <= 1
            and 0 <= args.ema_decay < 1 and 1 <= args.guidance_scale < math.inf):
        raise TrainError("need finite --lr > 0, --warmup-steps >= 1, 0 <= --min-lr-fraction <= 1, 0 <= --ema-decay < 1, "
                         "finite --guidance-scale >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.export_only is not None:
        print(f"exported {export_checkpoint(out, args.export_only)}")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        logfile = open(out / "train.log", "a", buffering=1)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise TrainError(f"cannot write to {out}: {exc}") from None

    def log(line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, flush=True)
        logfile.write(stamped + "\n")

    config = TrainConfig(
        # --resume without --steps keeps the checkpoint's length (train() raises it to this one's, were it 5000)
        steps=args.steps or (0 if args.resume else TrainConfig.steps),
        init_from=None if args.init_from is None else str(Path(args.init_from).resolve()),
        **{n: getattr(args, n) for n in _FLAGS + _ARCHITECTURE},
    )
    with logfile:
        train(config, out, minutes=args.minutes, resume=args.resume, steps=args.steps if args.resume else None,
              device=device, workers=args.workers, fit_steps=args.fit_steps, log=log)

if __name__ == "__main__":
    sys.exit(main())
