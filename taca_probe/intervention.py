"""Installing TACA on a pipeline or transformer: ``TacaConfig``, ``apply_taca`` and ``taca()``.

Processors go in through ``set_attn_processor`` and the exact originals come back on removal. A
call's denoising step is read, never counted: from the pipeline's scheduler (right under FLUX true
CFG and SD3 batched CFG alike), or on a bare transformer from the call's timestep (a smaller one
starts the next step, a larger one a new run).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import math
import numbers
import os
from dataclasses import dataclass, field, is_dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch

from .errors import TacaProbeError
from .models import check_supported
from .processors import Observer, RunState, SUPPORTED_PROCESSORS, TacaAttnProcessor, find_sites, wrap_processor
from .schedules import Schedule, parse
from .selection import positive_int

__all__ = ["TacaConfig", "TacaHandle", "CallRecord", "CallListener", "apply_taca", "taca"]

_HANDLE_ATTR = "_taca_probe_handle"
# Timesteps closer than this (0..1000 scale) belong to the same step (bf16 rounding of t/1000).
_T_EPS = 1e-3
# diffusers hooks that leave every transformer and attention call as it is; the others (first-block,
# pyramid, faster caches, layer skip, ...) skip blocks or reuse outputs, so TACA and the probe would
# act at only some of the steps and layers they report.
_PASSIVE_HOOKS = {"group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading",
                  "layerwise_casting", "peft_autocast_disable"}


@dataclass(frozen=True)
class TacaConfig:
    """What to install.

    Parameters
    ----------
    schedule
        A :class:`~taca_probe.schedules.Schedule` or its string form (default: the paper's
        ``"step:1.2@970"``; ``"none"`` changes nothing).
    lora
        Optional LoRA active exactly at the steps where some layer has gamma != 1: a file or folder
        for diffusers' ``load_lora_adapter``, or the name of an adapter loaded on the transformer.
    lora_scale
        Weight of that LoRA while active.
    num_inference_steps
        Total steps, for step-fraction schedules on a bare transformer.
    """

    schedule: Schedule | str = "step:1.2@970"
    lora: str | os.PathLike | None = None
    lora_scale: float = 1.0
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse(self.schedule))
        # Checked here, not at the first transformer call or deep inside diffusers' adapter API.
        if self.lora is not None and not isinstance(self.lora, (str, os.PathLike)):
            raise TacaProbeError(f"lora must be a path or the name of a loaded adapter, got {type(self.lora).__name__}")
        if not isinstance(self.lora_scale, numbers.Real) or isinstance(self.lora_scale, bool) \
                or not math.isfinite(self.lora_scale):
            raise TacaProbeError(f"lora_scale must be a finite number, got {self.lora_scale!r}")
        positive_int(self.num_inference_steps, "num_inference_steps", none_ok=True)


@dataclass(frozen=True)
class CallRecord:
    """One transformer forward call as TACA saw it."""

    step: int
    t: float  # timestep, 0..1000
    sigma: float | None  # the scheduler's sigma at this step (None on a bare transformer)
    num_steps: int | None
    n_txt: int | None
    active: bool  # some layer had gamma != 1
    lora_active: bool | None  # None when no LoRA is managed
    gammas: Mapping[str, float] = field(default_factory=dict)  # site name -> gamma of this call


#: Told of every transformer call, after the handle located it: ``before(call, arguments)`` may
#: return an observer for this call's attention sites; ``after(call)`` runs when the call returned.
CallListener = tuple[Callable[[CallRecord, Mapping[str, Any]], "Observer | None"] | None,
                     Callable[[CallRecord], None] | None]


class _LoraSwitch:
    """Turns one PEFT adapter on and off through diffusers' adapter API, reversibly."""

    def __init__(self, transformer: torch.nn.Module, lora: str | os.PathLike, scale: float):
        if not hasattr(transformer, "set_adapters"):
            raise TacaProbeError(f"{type(transformer).__name__} has no LoRA support (diffusers PeftAdapterMixin)")
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer  # peft is optional (the lora extra)
        except ImportError:
            raise TacaProbeError("LoRA switching needs peft: pip install 'taca-probe[lora]'") from None
        self.transformer, self.scale = transformer, scale
        layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        if any(m.merged for m in layers):  # peft unmerges a fused LoRA to switch adapters, for good
            raise TacaProbeError("a LoRA is fused into the transformer's weights; switching adapters would unfuse it: "
                                 "call unfuse_lora() before taca(lora=...)")
        loaded = set(getattr(transformer, "peft_config", {}) or {})
        self.prev_active = list(transformer.active_adapters()) if loaded else []
        self.prev_enabled = bool(loaded) and not any(m.disable_adapters for m in layers)
        # Each layer's adapter weights: set_adapters() resets those it is not given to 1.
        self.scalings = {m: dict(m.scaling) for m in layers if isinstance(getattr(m, "scaling", None), dict)}
        if str(lora) in loaded:
            self.name, self.owned = str(lora), False
        else:
            if not os.path.exists(lora):
                raise TacaProbeError(f"LoRA {str(lora)!r} is neither a file/folder nor a loaded adapter "
                                     f"(loaded: {', '.join(sorted(loaded)) or 'none'})")
            self.name, self.owned, i = "taca", True, 0
            while self.name in loaded:
                i += 1
                self.name = f"taca_{i}"
            folder, weight_name = _lora_file(lora)
            try:
                # Only the transformer's part of a LoRA file: the text encoders run once per prompt,
                # not per step, so there is nothing there to switch.
                transformer.load_lora_adapter(folder, weight_name=weight_name, adapter_name=self.name,
                                              prefix="transformer")
            except Exception as e:  # diffusers/peft raise many kinds; report one line
                raise TacaProbeError(f"cannot load LoRA {str(lora)!r}: {str(e).splitlines()[0]}") from None
            if self.name not in (getattr(transformer, "peft_config", None) or {}):
                # diffusers only logs this (no keys under "transformer.", e.g. another trainer's
                # format); TACA would then run without the LoRA it was given.
                raise TacaProbeError(f"LoRA {str(lora)!r} holds no weights for the transformer in diffusers' format; "
                                     "load it with pipe.load_lora_weights(path, adapter_name=NAME) and pass lora=NAME")
        # The user's other active adapters (a style LoRA) stay on at every step, at their weights.
        self.others = [a for a in self.prev_active if a != self.name] if self.prev_enabled else []
        self.on: bool | None = None
        self.set(False)

    def set(self, on: bool) -> None:
        if on == self.on:
            return
        names = self.others + [self.name] if on else self.others
        if names:
            self.transformer.enable_lora()
            self.transformer.set_adapters(names, [1.0] * len(self.others) + ([self.scale] if on else []))
            self._restore_weights(self.others)
        else:
            self.transformer.disable_lora()
        self.on = on

    def _restore_weights(self, names: list[str]) -> None:
        for layer, scaling in self.scalings.items():
            layer.scaling.update({a: w for a, w in scaling.items() if a in names and a in layer.scaling})

    def restore(self) -> None:
        t = self.transformer
        if self.owned:
            t.delete_adapters(self.name)
        if self.prev_active:
            t.enable_lora()
            t.set_adapters(self.prev_active)
            self._restore_weights(self.prev_active)
            if not self.prev_enabled:
                t.disable_lora()
        elif getattr(t, "peft_config", None):
            t.disable_lora()


def _lora_file(path: str | os.PathLike) -> tuple[str, str]:
    """(folder, weight file name) of a LoRA given as a file, or as a folder holding one."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    candidates = [f for f in files if f.startswith("pytorch_lora_weights")] or files
    if len(candidates) != 1:
        raise TacaProbeError(f"LoRA folder {path!r} must hold exactly one .safetensors/.bin weight file "
                             f"(found: {', '.join(files) or 'none'})")
    return path, candidates[0]


class TacaHandle:
    """What :func:`apply_taca` installed; ``remove()`` restores the model exactly.

    Attributes
    ----------
    config : TacaConfig
    sites : list of Site, the attention modules TACA wraps, in transformer order
    calls : list of CallRecord, one per transformer forward call since installation
    """

    def __init__(self, target: Any, config: TacaConfig):
        pipe = target if hasattr(target, "transformer") and not isinstance(target, torch.nn.Module) else None
        outer = pipe.transformer if pipe is not None else target
        # torch.compile(transformer) wraps it: processors go on the model inside, the per-call hooks
        # on the wrapper, so that they run eagerly, before the compiled forward.
        transformer = getattr(outer, "_orig_mod", outer)
        self.family = check_supported(transformer)
        if getattr(transformer, _HANDLE_ATTR, None) is not None:
            raise TacaProbeError("taca-probe is already installed on this transformer; leave the active taca()/probe() "
                                 "context (or call its handle's remove()) before installing again")
        self.config, self.pipe, self.transformer = config, pipe, transformer
        self.schedule: Schedule = config.schedule  # parsed by TacaConfig
        if self.schedule.needs_num_steps and pipe is None and config.num_inference_steps is None:
            raise TacaProbeError(f"schedule {self.schedule.spec!r} needs the number of steps: pass "
                                 "num_inference_steps= when installing on a bare transformer")
        _check_attention_backend(transformer)
        hooks = {h for m in transformer.modules() for h in getattr(getattr(m, "_diffusers_hook", None), "hooks", ())}
        if hooks - _PASSIVE_HOOKS:
            raise TacaProbeError(f"diffusers hooks {', '.join(sorted(hooks - _PASSIVE_HOOKS))} skip or reuse attention "
                                 "calls; remove them (transformer.disable_cache() for a cache) before taca()/probe()")
        self.sites = find_sites(transformer, self.family)
        if not self.schedule.is_identity:  # one that selects no layer here would report TACA it never applied
            for pattern in getattr(self.schedule, "layers", None) or ():
                if not any(fnmatch.fnmatchcase(s.name, pattern) for s in self.sites):
                    raise TacaProbeError(f"schedule {self.schedule.spec!r}: layers={pattern} matches none of this "
                                         f"model's {len(self.sites)} attention layers ({self.sites[0].name} ... "
                                         f"{self.sites[-1].name})")
            if hasattr(self.schedule, "selects") and not any(
                    self.schedule.selects(layer=s.name, block_type=s.block_type) for s in self.sites):
                raise TacaProbeError(f"schedule {self.schedule.spec!r} selects none of this model's attention layers")
        self.state = RunState(self.sites)
        self.calls: list[CallRecord] = []
        self._gamma_views: dict[tuple[float, ...], MappingProxyType] = {}
        self._schedule_src: Any = None  # the scheduler's timesteps tensor that _schedule_host mirrors
        self._schedule_host: tuple[list[float], list[float] | None] = ([], None)
        self._last_t: float | None = None
        self._step = -1

        self._original = dict(transformer.attn_processors)  # the exact objects, by identity
        new = dict(self._original)
        for site in self.sites:
            inner = self._original[f"{site.name}.processor"]
            if isinstance(inner, TacaAttnProcessor) or type(inner).__name__ not in SUPPORTED_PROCESSORS:
                # These transformers have no set_default_attn_processor(): name the stock class.
                stock = {"sd3": "JointAttnProcessor2_0", "flux": "FluxAttnProcessor"}[self.family]
                raise TacaProbeError(f"{site.name} uses {type(inner).__name__}; TACA wraps only "
                                     f"{', '.join(SUPPORTED_PROCESSORS)} (restore diffusers' own with "
                                     f"transformer.set_attn_processor({stock}()))")
            new[f"{site.name}.processor"] = wrap_processor(inner, site, self.state)
        self._wrapped = [(transformer.get_submodule(s.name), new[f"{s.name}.processor"]) for s in self.sites]
        self._lora = _LoraSwitch(transformer, config.lora, config.lora_scale) if config.lora is not None else None
        self._sig = inspect.signature(transformer.forward)
        transformer.set_attn_processor(new)  # it pops the dict it is given: new is a copy of _original
        self._listeners: list[CallListener] = []
        self._hooks = [outer.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       outer.register_forward_hook(self._post_forward)]
        setattr(transformer, _HANDLE_ATTR, self)
        self._removed = False

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # set_attn_processor() or SD3's fuse_qkv_projections() inside the block would run stock
        # attention while the handle and the probe report TACA.
        for attn, proc in self._wrapped:
            if attn.processor is not proc:
                raise TacaProbeError(f"the attention processor of {proc.site.name} was replaced inside taca()/probe() "
                                     f"(now {type(attn.processor).__name__}); change processors or fuse projections "
                                     "before entering the block")
        bound = self._sig.bind_partial(*args, **kwargs).arguments  # the forward's arguments by name
        enc = bound.get("encoder_hidden_states")  # (B, N_txt, C)
        self.state.n_txt = None if enc is None else int(enc.shape[1])
        step, t, sigma, num_steps = self._locate(bound.get("timestep"))
        gammas = {s.name: self.schedule.gamma(t=t, step=step, num_steps=num_steps, layer=s.name,
                                              block_type=s.block_type) for s in self.sites}
        # one read-only mapping per distinct setting: a long generation loop keeps every call's record
        self.state.gammas = gammas = self._gamma_views.setdefault(tuple(gammas.values()), MappingProxyType(gammas))
        active = any(g != 1.0 for g in gammas.values())
        if self._lora is not None:
            self._lora.set(active)
        call = CallRecord(step, t, sigma, num_steps, self.state.n_txt, active,
                          None if self._lora is None else self._lora.on, gammas)
        self.calls.append(call)
        self.state.observer = None
        for before, _ in self._listeners:
            observer = before(call, MappingProxyType(bound)) if before is not None else None
            if observer is not None:
                self.state.observer = observer

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.state.observer = None
        for _, after in self._listeners:
            if after is not None:
                after(self.calls[-1])

    def listen(self, before=None, after=None) -> Callable[[], None]:
        """Be told of every transformer call (see :data:`CallListener`); returns the remover.

        The handle calls listeners from its own hooks, after it has located the call, so a
        listener never depends on the order in which hooks were registered.
        """
        entry = (before, after)
        self._listeners.append(entry)
        return lambda: self._listeners.remove(entry) if entry in self._listeners else None

    def _locate(self, timestep: Any) -> tuple[int, float, float | None, int | None]:
        """(step index, t on 0..1000, sigma, number of steps) of the current call."""
        sched = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(sched, "timesteps", None)
        if timesteps is not None and len(timesteps):
            if timesteps is not self._schedule_src:
                # The scheduler's timesteps may live on the GPU: read them once per run, not per
                # call, so that no transformer call waits for the device.
                sigmas = getattr(sched, "sigmas", None)
                self._schedule_src = timesteps
                self._schedule_host = ([float(x) for x in timesteps.tolist()],
                                       None if sigmas is None else [float(x) for x in sigmas.tolist()])
            ts, sig = self._schedule_host
            idx = sched.step_index
            if idx is None:  # before the first scheduler.step() of a run
                idx = sched.begin_index if getattr(sched, "begin_index", None) is not None else 0
            if idx < len(ts):
                return idx, ts[idx], (sig[idx] if sig is not None and idx < len(sig) else None), len(ts)
        if timestep is None:
            raise TacaProbeError("the transformer was called without a timestep; TACA schedules need one")
        # Bare transformer: read t from the call (one host sync per call, not per layer).
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        if self.family == "flux":
            t *= 1000.0  # FLUX passes t / 1000
        if self._last_t is None or t > self._last_t + _T_EPS:
            self._step = 0  # a new run starts at a higher noise level
        elif t < self._last_t - _T_EPS:
            self._step += 1
        self._last_t = t
        return self._step, t, None, self.config.num_inference_steps

    def remove(self) -> None:
        """Restore the original processors (by identity), LoRA state and hooks. Idempotent."""
        if self._removed:
            return
        self._removed = True
        try:
            for hook in self._hooks:
                hook.remove()
            self._listeners.clear()
            self.state.observer = None
            self.transformer.set_attn_processor(dict(self._original))
            saved = getattr(self.transformer, "original_attn_processors", None)
            if saved and any(isinstance(p, TacaAttnProcessor) for p in saved.values()):
                # fuse_qkv_projections() inside the block saved the wrappers for unfuse_qkv_projections()
                self.transformer.original_attn_processors = dict(self._original)
            if self._lora is not None:
                self._lora.restore()
        finally:
            setattr(self.transformer, _HANDLE_ATTR, None)

    def __repr__(self) -> str:
        return (f"<TacaHandle {'removed' if self._removed else 'active'}: schedule {self.schedule.spec!r} on "
                f"{len(self.sites)} attention sites of {type(self.transformer).__name__}; {len(self.calls)} "
                f"transformer calls, steps_active={self.steps_active}>")

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` has run (the model is back as it was)."""
        return self._removed

    @property
    def steps_active(self) -> list[int]:
        """Sorted distinct steps at which some layer had gamma != 1."""
        return sorted({c.step for c in self.calls if c.active})


def _check_attention_backend(transformer: torch.nn.Module) -> None:
    """FLUX dispatches attention through diffusers' backend registry; TACA needs the native one."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    except ImportError:  # older diffusers: SDPA is called directly
        return
    active = _AttentionBackendRegistry.get_active_backend()[0]
    names = set()
    for proc in transformer.attn_processors.values():
        # Only processors with a backend slot dispatch (FLUX); SD3's call SDPA whatever the registry says.
        if hasattr(proc, "_attention_backend"):
            backend = proc._attention_backend or active  # unset: the registry's active backend
            names.add(str(getattr(backend, "value", backend)))
    other = names - {AttentionBackendName.NATIVE.value}
    if other:
        # Not reset_attention_backend(): it leaves the registry's active backend (which
        # set_attention_backend also set) in place.
        raise TacaProbeError(f"TACA needs diffusers' native attention backend, found {', '.join(sorted(other))}; "
                             "unset DIFFUSERS_ATTN_BACKEND or call transformer.set_attention_backend('native')")


class _Reusable(contextlib.ContextDecorator):
    """One :func:`reusable` call's object: each ``with`` runs the generator afresh (a stack for nesting)."""

    def __init__(self, make: Callable[[], contextlib.AbstractContextManager], shown: str):
        self._make, self._shown, self._entered = make, shown, []

    def __repr__(self) -> str:
        return f"<{self._shown}{' (active)' if self._entered else ''}>"

    def __enter__(self) -> Any:
        cm = self._make()
        value = cm.__enter__()  # a refusal here leaves nothing to undo
        self._entered.append(cm)
        return value

    def __exit__(self, *exc: Any) -> bool | None:
        return self._entered.pop().__exit__(*exc)


def reusable(func: Callable[..., Iterator[Any]]) -> Callable[..., contextlib.AbstractContextManager]:
    """``contextlib.contextmanager`` whose objects may be entered again, as ``torch.no_grad()``'s may:
    every ``with`` runs ``func`` anew with the same arguments, and its exit undoes that entry only."""
    gen, sig = contextlib.contextmanager(func), inspect.signature(func)

    def shown(value: Any) -> str:  # a pipeline or model by its class: their reprs run to pages
        return repr(value) if value is None or isinstance(value, (str, numbers.Number, os.PathLike)) \
            or is_dataclass(value) else type(value).__name__

    @functools.wraps(func)
    def make(*args: Any, **kwargs: Any) -> _Reusable:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:  # as calling func would say it
            raise TypeError(f"{func.__name__}() {e}") from None
        bound.apply_defaults()  # what it would install, defaults included
        first, *rest = bound.arguments.items()
        call = ", ".join([shown(first[1])] + [f"{k}={shown(v)}" for k, v in rest])
        return _Reusable(lambda: gen(*args, **kwargs), f"{func.__name__}({call})")
    return make


def apply_taca(target: Any, config: TacaConfig | None = None) -> TacaHandle:
    """Install TACA on a pipeline or transformer; call ``handle.remove()`` to undo.

    Parameters
    ----------
    target
        A ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (or any pipeline with such a
        ``.transformer``), or a bare ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``.
    config
        What to install; default ``TacaConfig()`` (the paper's ``step:1.2@970``).

    Returns
    -------
    TacaHandle
    """
    if config is not None and not isinstance(config, TacaConfig):
        raise TacaProbeError(f"apply_taca's config must be a TacaConfig, got {type(config).__name__}"
                             + (f"; for a schedule pass TacaConfig({config!r})" if isinstance(config, str) else ""))
    return TacaHandle(target, config or TacaConfig())


@reusable
def taca(target: Any, schedule: Schedule | str = "step:1.2@970", *, lora: str | os.PathLike | None = None,
         lora_scale: float = 1.0, num_inference_steps: int | None = None) -> Iterator[TacaHandle]:
    """Apply TACA inside a ``with`` block; the original processors come back on exit, always.

    Parameters are those of :class:`TacaConfig`; ``target`` as for :func:`apply_taca`. The object
    may be entered again: each ``with`` installs afresh and yields a new :class:`TacaHandle`.

    Examples
    --------
    >>> with taca(pipe, "step:1.2@970"):
    ...     image = pipe("a red cube on a blue table", num_inference_steps=28).images[0]
    """
    handle = apply_taca(target, TacaConfig(schedule, lora, lora_scale, num_inference_steps))
    try:
        yield handle
    finally:
        handle.remove()
