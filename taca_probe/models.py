"""Models: loading, devices and dtypes, the supported-model check and the call settings.

Besides local folders and cached hub models, four tiny pipelines are *embedded*: the trained
``shapes`` model (weights ship in the package; the default) and three random-weight recipes built
into a cache by :mod:`taca_probe.tiny_models`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.resources
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import ModelError, first_line
from .logs import quiet

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "RANDOM_MODELS",
    "SHIPPED_MODELS",
    "call_settings",
    "check_supported",
    "embedded_model_path",
    "load_pipeline",
    "model_call_defaults",
    "model_name",
    "resolve_device",
    "resolve_dtype",
]

_RANDOM = "random weights: exercises the machinery, not the science"

#: Trained embedded models whose weights ship inside the package: name -> (package, folder).
SHIPPED_MODELS: dict[str, tuple[str, str]] = {"shapes": ("taca_probe.shapes", "weights")}

#: The random-weight recipes (built into the cache on first use), for tests that need a particular architecture.
RANDOM_MODELS: tuple[str, ...] = ("tiny-sd3", "tiny-sd35", "tiny-flux")

#: Name of the file, next to a pipeline's model_index.json, that holds its recommended
#: ``pipe(...)`` arguments (written by ``python -m taca_probe.shapes.train``).
CALL_DEFAULTS_FILE = "call_defaults.json"

#: Embedded tiny pipelines, name -> one-line description.
EMBEDDED_MODELS: dict[str, str] = {
    "shapes": (
        "tiny Stable Diffusion 3 pipeline (6 joint blocks, 256 image + 32 text tokens, 64x64 px) TRAINED on "
        "procedural coloured shapes: follows prompts like 'a red circle to the left of a blue square'"
    ),
    "tiny-sd3": (
        "tiny Stable Diffusion 3 pipeline (3 joint blocks, the last context_pre_only; CLIP-L/G + T5); "
        + _RANDOM
    ),
    "tiny-sd35": (
        "tiny Stable Diffusion 3.5-style pipeline (3 joint blocks, dual attention in blocks 0-1, "
        "RMSNorm q/k; CLIP-L/G + T5); " + _RANDOM
    ),
    "tiny-flux": (
        "tiny FLUX.1-dev-style pipeline (2 joint + 2 single-stream blocks, guidance embedding; "
        "CLIP-L + T5); " + _RANDOM
    ),
}

#: The model used when none is named: the trained one, whose attention means something.
DEFAULT_MODEL = "shapes"


_DEVICE_FORMS = "cpu, cuda, cuda:N (N = GPU index), mps"
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A :class:`torch.device` that exists on this machine.

    ``device`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (case-insensitive); ``None`` picks
    CUDA when available, else the CPU. Raises :class:`ModelError` for a malformed or absent device.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    try:
        resolved = torch.device(text) if _DEVICE_RE.match(text) else None
    except RuntimeError:  # "cuda:01", an index too large to parse
        resolved = None
    if resolved is None or str(resolved) != text:  # torch wraps an index past 127 (cuda:128 -> cuda:-128)
        raise ModelError(f"invalid device {str(device)!r}; valid forms: {_DEVICE_FORMS}")
    # Fail here, with a message naming what exists, rather than deep inside the first .to().
    available = _available_devices()
    if str(resolved) not in available:
        raise ModelError(
            f"device {text!r} is not available on this machine; available: {', '.join(available)}"
            f" (valid forms: {_DEVICE_FORMS})"
        )
    return resolved


_DTYPES: dict[str, torch.dtype] = {  # short and long names
    name: dtype
    for dtype, short in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))
    for name in (short, str(dtype).removeprefix("torch."))
}
_DTYPE_CHOICES = "fp32 (float32), bf16 (bfloat16), fp16 (float16)"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A :class:`torch.dtype` from ``"fp32"``, ``"bf16"``, ``"fp16"`` (or their long names, the dtype itself).

    ``None`` is the device's default: bfloat16 on CUDA (float16 on GPUs without bfloat16), float32
    elsewhere. Raises :class:`ModelError` for anything else.
    """
    if dtype is None:
        if torch.device(device).type == "cuda":
            # Pre-Ampere GPUs emulate bf16 slowly; fp16 is their native half type.
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelError(f"unsupported dtype {dtype}; choose one of: {_DTYPE_CHOICES}")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"invalid dtype {str(dtype)!r}; choose one of: {_DTYPE_CHOICES}")
    return _DTYPES[key]


_SUPPORTED = "SD3Transformer2DModel (SD3, SD3.5) or FluxTransformer2DModel (FLUX.1)"


def check_supported(pipe_or_transformer: Any) -> str:
    """The MM-DiT family of a pipeline or transformer: ``"sd3"`` (SD3, SD3.5) or ``"flux"`` (FLUX.1).

    A ``torch.compile`` wrapper is looked through. Raises :class:`ModelError` when there is no
    transformer or its class is not supported.
    """
    obj = pipe_or_transformer
    transformer = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "transformer", None)
    if transformer is None:
        raise ModelError(
            f"unsupported model: {type(obj).__name__} has no MM-DiT transformer; "
            f"taca-probe supports pipelines whose transformer is {_SUPPORTED}"
        )
    # torch.compile returns an OptimizedModule that keeps the real module in _orig_mod.
    transformer = getattr(transformer, "_orig_mod", transformer)
    for family, cls in (("sd3", SD3Transformer2DModel), ("flux", FluxTransformer2DModel)):
        if isinstance(transformer, cls):
            return family
    raise ModelError(
        f"unsupported model: transformer class {type(transformer).__name__} is not supported; "
        f"supported transformer classes: {_SUPPORTED}"
    )


def _hub_cached(model: str) -> bool | None:
    """Whether the repo id ``model`` has a model_index.json in the local HF cache (None: not a repo id)."""
    try:
        validate_repo_id(model)
    except HFValidationError:
        return None
    try:
        found = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # noqa: BLE001 - a cache we cannot read counts as "not cached"
        return False
    return isinstance(found, str)


def load_pipeline(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> DiffusionPipeline:
    """Load a diffusers pipeline, without touching the network.

    Parameters
    ----------
    model : str or os.PathLike
        One of :data:`EMBEDDED_MODELS` (built into the cache on first use), a local diffusers folder
        (a directory containing ``model_index.json``), or a Hugging Face hub id that is already in
        the local Hugging Face cache (e.g. fetched with ``hf download <id>``), tried in that order
        (write ``./tiny-sd3`` for a folder that shares an embedded model's name).
    device : str, torch.device or None
        See :func:`resolve_device`.
    dtype : str, torch.dtype or None
        See :func:`resolve_dtype`.

    Returns
    -------
    diffusers.DiffusionPipeline
        On ``device``; not checked for support (:func:`check_supported` does that).

    Raises
    ------
    ModelError
        If the model cannot be found locally, or loading it fails.
    """
    model = os.fspath(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    if model in EMBEDDED_MODELS:
        source: str | Path = embedded_model_path(model)
        what = f"embedded model {model!r} from {source}"
        hint = "; reinstall taca-probe" if model in SHIPPED_MODELS else f"; delete {source} to rebuild it"
    elif os.path.exists(os.path.expanduser(model)):
        folder = Path(os.path.expanduser(model))
        if not folder.is_dir():
            raise ModelError(
                f"model {model!r} is a file, not a diffusers folder; pass a folder containing "
                f"model_index.json (single-file checkpoints are not supported), a hub id, or one of "
                f"the embedded models: {', '.join(EMBEDDED_MODELS)}"
            )
        if not (folder / "model_index.json").is_file():
            raise ModelError(
                f"folder {model!r} is not a diffusers pipeline folder (it has no model_index.json); "
                f"pass a folder saved with save_pretrained, a hub id, or one of the embedded models: "
                f"{', '.join(EMBEDDED_MODELS)}"
            )
        source, what, hint = folder, f"folder {model!r}", ""
    else:
        cached = _hub_cached(model)
        if not cached:
            why = (
                "not in the local Hugging Face cache; fetch it with `hf download "
                f"{model}` and retry, or pass a local folder"
                if cached is False
                else "not a valid Hugging Face model id"
            )
            close = difflib.get_close_matches(model, list(EMBEDDED_MODELS), n=1, cutoff=0.6)
            if close:  # a misspelled embedded name is likelier than an uncached hub id
                raise ModelError(f"unknown model {model!r}: did you mean {close[0]!r}? (embedded models: "
                                 f"{', '.join(EMBEDDED_MODELS)}; it is also no local folder, and {why})")
            raise ModelError(
                f"model {model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor an "
                f"existing local folder, and is {why}"
            )
        source, what = model, f"hub model {model!r} from the local Hugging Face cache"
        hint = f"; it may be incomplete: run `hf download {model}` and retry"

    with quiet() if model in EMBEDDED_MODELS else contextlib.nullcontext():
        try:
            # dtype= (not the deprecated torch_dtype=); local_files_only so nothing is downloaded.
            pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one readable line
            raise ModelError(f"cannot load {what}: {first_line(exc)}{hint}") from exc
        # Inside quiet for the embedded models: diffusers' "fp16 cannot run on the CPU" warning
        # is stale (torch 2.13 runs the tiny models in fp16 on the CPU).
        pipe = pipe.to(torch_device)
    # The name as the user gave it ("shapes", not the package folder): stores record it, as the CLI does.
    pipe._taca_probe_model = model
    return pipe


def _name_or_path(pipe: Any) -> str:
    return str(getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")


def model_name(pipe: Any) -> str:
    """The name a pipeline was loaded by (:func:`load_pipeline`), else its ``name_or_path``."""
    return str(getattr(pipe, "_taca_probe_model", None) or _name_or_path(pipe))


def _shipped_path(name: str) -> Path:
    """The folder of a shipped model inside the installed package, checked to be complete."""
    package, folder = SHIPPED_MODELS[name]
    path = Path(str(importlib.resources.files(package) / folder))
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"embedded model {name!r} has no weights at {path} (incomplete installation); reinstall "
            f"taca-probe, or train them with `python -m {package}.train --out DIR` and pass DIR/pipeline as the model"
        )
    return path


def model_call_defaults(model: str | os.PathLike[str] | Any) -> dict[str, Any]:
    """The recommended ``pipe(...)`` arguments of a model, from ``call_defaults.json`` beside its model_index.json.

    Trained models need them: the shapes model was trained with 16 T5 tokens, and SD3's default
    ``max_sequence_length=256`` would append 240 padding tokens it never saw. ``model`` is an
    embedded name, a local folder or a loaded pipeline. Returns a new dict, empty for models without
    the file; raises :class:`ModelError` if the file is unreadable or a shipped model is missing.
    """
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        if name in EMBEDDED_MODELS and name not in SHIPPED_MODELS:
            return {}
        folder = _shipped_path(name) if name in SHIPPED_MODELS else Path(os.path.expanduser(name))
    else:
        source = _name_or_path(model)
        if not source:
            return {}
        folder = Path(os.path.expanduser(source))
    file = folder / CALL_DEFAULTS_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {file}: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{file} must hold a JSON object of pipe(...) arguments")
    return data


def call_settings(
    pipe: Any,
    overrides: Mapping[str, Any] | None = None,
    *,
    model: str | os.PathLike[str] | None = None,
    default_steps: int | None = 28,
    default_size: int | None = None,
) -> dict[str, Any]:
    """The ``pipe(...)`` arguments of a call: the user's, else the model's recommended, else defaults.

    Parameters
    ----------
    pipe : DiffusionPipeline
        Gives the size fallback, and the recommended settings unless ``model`` names them.
    overrides : mapping, optional
        The user's settings; ``None`` values mean "not given".
    model : str or os.PathLike, optional
        The name the model was loaded by: its :func:`model_call_defaults` are read by that name.
    default_steps : int or None
        Steps when neither user nor model gives them; ``None``: the pipeline's own default.
    default_size : int or None
        Height and width likewise; ``None``: ``default_sample_size * vae_scale_factor``.

    Returns
    -------
    dict
        A new dict that always holds ``height``, ``width`` (and ``num_inference_steps`` unless
        ``default_steps`` is None).
    """
    call = model_call_defaults(model if isinstance(model, (str, os.PathLike)) else pipe)
    call.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if default_steps is not None:
        call.setdefault("num_inference_steps", default_steps)
    if default_size is None:
        default_size = int(getattr(pipe, "default_sample_size", 128)) * int(getattr(pipe, "vae_scale_factor", 8))
    call.setdefault("height", default_size)
    call.setdefault("width", default_size)
    return call


def embedded_model_path(name: str) -> Path:
    """The diffusers folder of an embedded model: inside the package, or a random recipe's cache folder.

    Raises :class:`ModelError` for an unknown name, an unwritable cache or missing shipped weights.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    if name in SHIPPED_MODELS:
        return _shipped_path(name)
    # Lazy, and inside quiet(): importing the pipeline classes logs torchvision fallbacks of image
    # processors the tiny models do not use; most runs never build a tiny model.
    with quiet():
        from .tiny_models import cached_model_path
    return cached_model_path(name)
