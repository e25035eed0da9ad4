"""Attention processors that apply TACA around diffusers' own processors.

A :class:`TacaAttnProcessor` runs the stock processor of one attention module unchanged, except
for its one ``scaled_dot_product_attention`` call, which a :class:`~torch.overrides.TorchFunctionMode`
entered only around the wrapped call routes to :func:`taca_probe.attention.taca_attention`. So the
projections, norms and rotary embeddings stay diffusers' own code, and nothing is patched.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .attention import JointLayout, taca_attention
from .errors import TacaProbeError

__all__ = ["Site", "RunState", "TacaAttnProcessor", "wrap_processor", "find_sites", "SUPPORTED_PROCESSORS"]

#: Names of the stock processor classes TACA wraps (the attention call inside is the native SDPA).
SUPPORTED_PROCESSORS = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "FluxAttnProcessor")

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass(frozen=True)
class Site:
    """One attention module that sees both modalities."""

    name: str  # module path, e.g. ``transformer_blocks.3.attn`` or ``single_transformer_blocks.0.attn``
    block_type: str  # "joint" (separate text and image projections) or "single" (FLUX single-stream)
    txt_first: bool  # token order: FLUX [txt, img] (True) or SD3 [img, txt] (False)
    index: int  # position in transformer order (0-based), the ``layer`` axis of recordings


def find_sites(transformer: torch.nn.Module, family: str) -> list[Site]:
    """The attention modules of ``transformer`` where text and image tokens meet, in order.

    SD3/SD3.5: every ``transformer_blocks.{i}.attn`` (``attn2`` of SD3.5 dual-attention blocks is
    image-only and is left alone). FLUX: ``transformer_blocks.{i}.attn`` (joint) and
    ``single_transformer_blocks.{i}.attn`` (single-stream).
    """
    sites: list[Site] = []
    for key in transformer.attn_processors:  # "transformer_blocks.0.attn.processor", in module order
        name = key.removesuffix(".processor")
        module = transformer.get_submodule(name)
        if getattr(module, "add_k_proj", None) is not None:
            block_type = "joint"
        elif family == "flux" and name.startswith("single_transformer_blocks."):
            block_type = "single"
        else:
            continue  # image-only attention (SD3.5 attn2): no text keys, nothing to scale
        sites.append(Site(name, block_type, txt_first=(family == "flux"), index=len(sites)))
    return sites


class RunState:
    """Per-transformer state that the processors read: gammas of the current call, text length."""

    def __init__(self, sites: list[Site], observer: "Observer | None" = None):
        self.sites = sites
        self.observer = observer
        self.n_txt: int | None = None
        self.gammas: Mapping[str, float] = {}

    def gamma(self, site: Site) -> float:
        return self.gammas.get(site.name, 1.0)


class _SDPAOverride(TorchFunctionMode):
    """Routes the one SDPA call of a wrapped processor to TACA; lets every other op through.

    Under ``torch.compile`` the call becomes one opaque ``taca_probe::attention`` op, so that nothing
    that differs between blocks or steps (site, gamma, probe buffers) is read into the one graph.
    """

    def __init__(self, proc: TacaAttnProcessor, n_txt: int | None, n_seq: int, compiled: bool):
        super().__init__()
        self.proc, self.n_txt, self.n_seq, self.compiled = proc, n_txt, n_seq, compiled
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            method = getattr(torch.Tensor, getattr(func, "__name__", ""), None) if self.compiled else None
            if method is func and args and isinstance(args[0], torch.Tensor):
                # As a method call, torch.compile records the op itself; called as the function
                # Tensor.<name>, it would trace the Python wrapper and break the graph there.
                return getattr(args[0], func.__name__)(*args[1:], **kwargs)
            return func(*args, **kwargs)
        self.calls += 1
        a = dict(zip(_SDPA_ARGS, args), **kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        site = self.proc.site
        if a.get("dropout_p", 0.0) or a.get("is_causal", False) or a.get("enable_gqa", False):
            raise TacaProbeError(f"{site.name}: TACA supports inference attention only (no dropout, causal or GQA)")
        if q.shape[2] != self.n_seq or k.shape[2] != self.n_seq:
            raise TacaProbeError(f"{site.name}: expected a joint sequence of {self.n_seq} tokens, "
                                 f"got queries {q.shape[2]} and keys {k.shape[2]}")
        if self.compiled:
            n_txt = -1 if self.n_txt is None else self.n_txt
            return torch.ops.taca_probe.attention(q, k, v, a.get("attn_mask"), a.get("scale"), n_txt, self.proc.key)
        return self.proc.attend(q, k, v, a.get("attn_mask"), a.get("scale"), self.n_txt)


# Processors by key, for the compiled op (which can carry only tensors and numbers).
_BY_KEY: "weakref.WeakValueDictionary[int, TacaAttnProcessor]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.library.custom_op("taca_probe::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  scale: Optional[float], n_txt: int, key: torch.Tensor) -> torch.Tensor:
    proc = _BY_KEY.get(int(key.item()))  # key lives on the CPU: no device sync
    if proc is None:
        raise TacaProbeError("a compiled graph called a TACA processor that was removed; recompile or "
                             "call torch._dynamo.reset() after leaving taca()/probe()")
    # custom ops return fresh, contiguous tensors (what the fake below promises)
    return proc.attend(q, k, v, attn_mask, scale, None if n_txt < 0 else n_txt).contiguous()


@_attention_op.register_fake
def _(q, k, v, attn_mask, scale, n_txt, key):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


class TacaAttnProcessor:
    """Wraps one stock processor; applies the gamma the run state holds for this site.

    Its ``__call__`` signature is the wrapped processor's (set by :func:`wrap_processor`), because
    diffusers' attention modules pass only the keyword arguments a processor's signature names.
    """

    def __init__(self, inner: Any, site: Site, state: RunState):
        self.inner, self.site, self.state = inner, site, state
        # A CPU tensor, not an int: under torch.compile a tensor is a graph input (its value is not
        # guarded), so the blocks' processors share one compiled graph.
        self.key = torch.tensor(next(_KEYS))
        _BY_KEY[int(self.key)] = self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(site={self.site.name!r}, inner={type(self.inner).__name__})"

    def attend(self, q, k, v, attn_mask, scale, n_txt: int | None) -> torch.Tensor:
        """The attention of this site's call: TACA with this step's gamma, measured if observed."""
        n_txt = self.state.n_txt if n_txt is None else n_txt  # FLUX single-stream: the forward call told it
        if n_txt is None:
            raise TacaProbeError(f"{self.site.name}: the text length is unknown; install TACA on the transformer "
                                 "(taca(pipe) or taca(transformer)) so its forward call provides it")
        layout = JointLayout(n_txt, self.site.txt_first)
        gamma, observer = self.state.gamma(self.site), self.state.observer
        if observer is None:
            return taca_attention(q, k, v, layout, gamma, scale=scale, attn_mask=attn_mask)
        out, parts = taca_attention(q, k, v, layout, gamma, scale=scale, attn_mask=attn_mask, with_parts=True)
        observer(self.site, q, k, layout, gamma, scale, parts)
        return out

    def _call(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        compiled = torch.compiler.is_compiling()
        if not compiled and self.state.gamma(self.site) == 1.0 and self.state.observer is None:
            return self.inner(attn, *args, **kwargs)  # the stock path, untouched
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, N, C): image (joint) or [txt, img] (single)
        enc = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")  # (B, N_txt, C) or None
        # FLUX single-stream (no enc): the processor cannot see where text ends; the run state knows.
        n_txt, n_seq = (None, hidden.shape[1]) if enc is None else (enc.shape[1], hidden.shape[1] + enc.shape[1])
        mode = _SDPAOverride(self, n_txt, n_seq, compiled)
        with mode:  # not "as mode": torch.compile loses that name when the block graph-breaks
            out = self.inner(attn, *args, **kwargs)
        if mode.calls != 1:
            raise TacaProbeError(f"{self.site.name}: {type(self.inner).__name__} made {mode.calls} native attention "
                                 "calls instead of 1; TACA needs diffusers' native attention backend "
                                 "(unset DIFFUSERS_ATTN_BACKEND / attention_backend())")
        return out


@functools.cache
def _wrapper_class(inner_cls: type) -> type:
    """The :class:`TacaAttnProcessor` subclass whose ``__call__`` signature is ``inner_cls``'s."""

    def __call__(self, attn, *args, **kwargs):  # noqa: N807
        return self._call(attn, *args, **kwargs)

    __call__.__signature__ = inspect.signature(inner_cls.__call__)  # type: ignore[attr-defined]
    return type(f"Taca{inner_cls.__name__}", (TacaAttnProcessor,), {"__call__": __call__})


def wrap_processor(inner: Any, site: Site, state: RunState) -> TacaAttnProcessor:
    """A :class:`TacaAttnProcessor` around ``inner`` whose call signature mirrors ``inner``'s."""
    return _wrapper_class(type(inner))(inner, site, state)


Observer = Callable[[Site, torch.Tensor, torch.Tensor, JointLayout, float, "float | None", dict], None]
