"""The random-weight test models (tiny-sd3, tiny-sd35, tiny-flux): built from configs, cached.

A recipe is configs with seeded random weights plus the shipped tokenizer files in
``tiny_models_data/``; it is built once into the cache and loaded from there like any diffusers
folder. They exercise the machinery, not the science: their images are noise.
:mod:`taca_probe.models` imports this module lazily, only to build.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .errors import ModelError, first_line
from .logs import quiet

__all__ = ["RECIPE_VERSION", "cached_model_path", "tokenizers"]

#: Bump whenever a recipe changes (configs, seeds, the tokenizer files): the cache folder name
#: carries it, so old builds are never silently reused for a new recipe.
RECIPE_VERSION = 1

_DATA = "tiny_models_data"  # package data: clip/ and t5/, each a transformers-saved tokenizer
_CLIP_MAX_LENGTH = 77  # CLIP's context; the SD3/FLUX pipelines read it from model_max_length
_T5_MAX_LENGTH = 512  # pipelines pass max_sequence_length (SD3 256, FLUX 512), at most 512

# Size rules that tie the components together (see the diffusers MM-DiT notes):
# SD3: caption_projection_dim = heads * head_dim; pooled_projection_dim = sum of the two CLIP
# projection dims; 2 * CLIP hidden <= T5 d_model (the CLIP pair is zero-padded to T5's width).
# FLUX: sum(axes_dims_rope) = head_dim; in_channels = 4 * VAE latent channels (2x2 packing);
# pooled_projection_dim = CLIP hidden size.
_CLIP_HIDDEN = 32
_T5_DIM = 64
_LATENT_CHANNELS = 16


def tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """The shipped CLIP (byte-level BPE) and T5 (unigram) tokenizers.

    Built from the tokenizer.json vocabularies rather than ``from_pretrained``, which would add
    loading keys (``is_local``...) to the tokenizer_config.json saved with every built model.
    """
    data = importlib.resources.files("taca_probe") / _DATA
    clip = json.loads((data / "clip" / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    t5 = json.loads((data / "t5" / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    return (
        CLIPTokenizer(
            vocab=clip["vocab"], merges=[tuple(m) for m in clip["merges"]], model_max_length=_CLIP_MAX_LENGTH
        ),
        T5Tokenizer(vocab=[tuple(p) for p in t5["vocab"]], extra_ids=0, model_max_length=_T5_MAX_LENGTH),
    )


def _seeded(key: str) -> None:
    # One seed per component, derived from a stable name: a component's weights do not depend
    # on what was built before it. The two SD3 variants share text encoders and VAE.
    torch.manual_seed(zlib.crc32(key.encode()))


def _clip_text_encoder(key: str, vocab_size: int, hidden_act: str, projection: bool) -> Any:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=2 * _CLIP_HIDDEN,
        projection_dim=_CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        # The pooled output is taken at the first EOS token: its id must match the tokenizer's.
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    _seeded(key)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(  # T5 v1.1 style, like the T5-XXL encoder of SD3 and FLUX
        vocab_size=vocab_size,
        d_model=_T5_DIM,
        d_kv=16,
        d_ff=2 * _T5_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    _seeded("t5")
    return T5EncoderModel(config).eval()


def _vae(key: str, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    _seeded(key)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four levels: three downsamplings, so the VAE scale factor is 8 as in the real models.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=_LATENT_CHANNELS,
        sample_size=64,
        # The real SD3 / FLUX VAEs have no quant convs and these latent normalisations.
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def _build_sd3(name: str) -> StableDiffusion3Pipeline:
    clip_tokenizer, t5_tokenizer = tokenizers()
    sd35 = name == "tiny-sd35"
    _seeded(f"{name}/transformer")
    transformer = SD3Transformer2DModel(
        sample_size=32,  # default image size 32 * 8 = 256 px
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        num_layers=3,  # diffusers makes the last block context_pre_only by itself
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=2 * 16,
        pooled_projection_dim=2 * _CLIP_HIDDEN,
        # The positional table is cropped to the latent grid: 64 patches = 1024 px at most.
        pos_embed_max_size=64,
        dual_attention_layers=(0, 1) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        # SD3 and SD3.5 ship shift 3.0 without dynamic shifting.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae("sd3/vae", scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text_encoder("sd3/clip_l", len(clip_tokenizer), "quick_gelu", True),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip_text_encoder("sd3/clip_g", len(clip_tokenizer), "gelu", True),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5_encoder(len(t5_tokenizer)),
        tokenizer_3=t5_tokenizer,
    )


def _build_flux(name: str) -> FluxPipeline:
    clip_tokenizer, t5_tokenizer = tokenizers()
    _seeded(f"{name}/transformer")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,  # latents are packed 2x2
        num_layers=2,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_CLIP_HIDDEN,
        guidance_embeds=True,  # FLUX.1-dev (guidance-distilled)
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return FluxPipeline(
        transformer=transformer,
        # FLUX.1-dev's scheduler: resolution-dependent shift between 0.5 and 1.15.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae("flux/vae", scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_encoder("flux/clip_l", len(clip_tokenizer), "quick_gelu", False),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5_encoder(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
    )


def _build_into(name: str, folder: Path) -> None:
    """Build tiny model ``name`` and save it (safetensors) into the existing ``folder``."""
    with quiet(), torch.random.fork_rng(devices=[]):
        # fork_rng: seeding for the build must not disturb the caller's global RNG stream.
        saved_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            pipe = _build_flux(name) if name == "tiny-flux" else _build_sd3(name)
        finally:
            torch.set_default_dtype(saved_dtype)
        pipe.save_pretrained(folder, safe_serialization=True)



_STALE_BUILD_S = 3600.0  # a build takes seconds; a temporary folder this old was abandoned


def _cache_root() -> Path:
    env = os.environ.get("TACA_PROBE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "taca-probe"


def cached_model_path(name: str) -> Path:
    """``<cache>/models/<name>-v<RECIPE_VERSION>``, built first if needed.

    ``<cache>`` is ``$TACA_PROBE_CACHE``, else ``$XDG_CACHE_HOME/taca-probe``, else
    ``~/.cache/taca-probe``. A build goes into a temporary sibling renamed into place when complete:
    an interrupted build leaves nothing half-written, and of two concurrent builds the first wins.
    Raises :class:`ModelError` for an unknown name or an unwritable cache.
    """
    if name not in ("tiny-sd3", "tiny-sd35", "tiny-flux"):
        raise ModelError(f"unknown tiny model {name!r}; tiny models: tiny-sd3, tiny-sd35, tiny-flux")
    models_dir = _cache_root() / "models"
    target = models_dir / f"{name}-v{RECIPE_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        for leftover in models_dir.glob(".*.building-*"):
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime > _STALE_BUILD_S:
                    shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=models_dir))
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache in {models_dir}: {first_line(exc)}; "
            "set TACA_PROBE_CACHE to a writable folder"
        ) from exc
    try:
        _build_into(name, tmp)
        # mkdtemp and the safetensors writer make owner-only folders/files; a cache is ordinary data.
        for path in (tmp, *tmp.rglob("*")):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        try:
            # Atomic on POSIX; fails when the target is a non-empty folder (another build won).
            os.rename(tmp, target)
        except OSError as exc:
            if not (target / "model_index.json").is_file():
                raise ModelError(
                    f"cannot put the built model {name!r} in place at {target}: {first_line(exc)}; "
                    "delete that folder and retry"
                ) from exc
    except OSError as exc:
        raise ModelError(
            f"cannot write embedded model {name!r} into {models_dir}: {first_line(exc)}; "
            "set TACA_PROBE_CACHE to a writable folder"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename
    return target
