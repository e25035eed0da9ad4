"""The attention math of TACA, on fused kernels, without the N x N matrix.

TACA multiplies the visual-query -> text-key logits of an MM-DiT's joint attention by ``gamma``: for
a visual query that is attention over keys whose text rows are ``gamma * k_j``, so one fused call
for the visual queries and one stock call for the text queries give exactly the paper's
``softmax([gamma * s_vt, s_vv]) V`` for the cost of one full call. At ``gamma == 1`` the stock
kernel is called as is, so the output is bit-identical to stock diffusers.

The probe's statistics come from log-sum-exps, never from a logit block. For a visual query ``i``
with ``L_t(i) = logsumexp_j(gamma * s_ij)`` over text keys and ``L(i)`` over all keys,
``exp(L_t - L)`` is its mass on text; ``L_t`` is one small fused call (about N_txt / S of a full
call). Per-token sums use the same identity with queries and keys swapped (:func:`_token_sums`).
Tensors are laid out as SDPA's ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import triton_stats

__all__ = ["JointLayout", "sdpa_with_lse", "taca_attention", "attention_statistics", "lse_backend", "stats_backend",
           "describe_stats_backend", "STATS_BACKENDS"]


@dataclass(frozen=True)
class JointLayout:
    """Where the text tokens sit in a joint sequence.

    Parameters
    ----------
    n_txt
        Number of text tokens, read from the call's inputs.
    txt_first
        True for FLUX (``[txt, img]``), False for SD3 (``[img, txt]``).
    """

    n_txt: int
    txt_first: bool

    def split(self, seq_len: int) -> tuple[slice, slice]:
        """``(txt, vis)`` slices over a sequence of ``seq_len`` tokens."""
        if not 0 < self.n_txt < seq_len:
            raise ValueError(f"text length {self.n_txt} does not fit a joint sequence of {seq_len} tokens")
        if self.txt_first:
            return slice(0, self.n_txt), slice(self.n_txt, seq_len)
        n_vis = seq_len - self.n_txt
        return slice(n_vis, seq_len), slice(0, n_vis)


def _lse_cpu(q, k, v, scale, attn_mask):
    # The kernel of F.scaled_dot_product_attention on CPU; it takes additive masks of q's dtype only.
    mask = None if attn_mask is None else _additive_mask(attn_mask, q.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                      scale=scale)[:2]


def _lse_cuda_cudnn(q, k, v, scale, attn_mask):
    bias = None if attn_mask is None else _additive_mask(attn_mask, q.dtype)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, False, False, scale=scale)
    lse = res[1]
    return res[0], lse.reshape(lse.shape[:3]) if lse.dim() == 4 else lse  # (B, H, L[, 1])


def _lse_cuda_auto(q, k, v, scale, attn_mask):
    """The backend stock SDPA would pick for these inputs, so that the output is stock's own."""
    choice = int(torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, False, scale=scale))
    first = {1: _lse_cuda_flash, 2: _lse_cuda_efficient, 3: _lse_cuda_cudnn}.get(choice)
    for fn in (first, _lse_cuda_efficient, _lse_cuda_flash):
        if fn is None:
            continue
        try:
            return fn(q, k, v, scale, attn_mask)
        except (RuntimeError, NotImplementedError):  # this kernel refuses these inputs
            continue
    return _lse_explicit(q, k, v, scale, attn_mask)


def _lse_cuda_flash(q, k, v, scale, attn_mask):
    if attn_mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
        raise NotImplementedError("flash attention: fp16/bf16 without mask only")
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], res[1]


def _lse_cuda_efficient(q, k, v, scale, attn_mask):
    bias = None
    if attn_mask is not None:
        bias = _additive_mask(attn_mask, q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)
    # The memory-efficient kernel pads the lse to a multiple of 32 queries.
    return res[0], res[1][..., : q.shape[2]]


def _additive_mask(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def _lse_explicit(q, k, v, scale, attn_mask, *, chunk: int = 1024):
    """Public-op fallback: explicit softmax in fp32, chunked over queries so memory stays bounded."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    kf, vf = k.float(), v.float()
    for start in range(0, q.shape[2], chunk):
        qs = q[:, :, start : start + chunk].float()
        s = torch.matmul(qs, kf.transpose(-1, -2)) * scale  # (B, H, chunk, Lk)
        if attn_mask is not None:
            m = attn_mask[..., start : start + chunk, :] if attn_mask.shape[-2] > 1 else attn_mask
            s = s + _additive_mask(m, torch.float32)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vf).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# On CUDA, first the kernel stock SDPA would choose (so that measuring at gamma = 1 leaves the
# output bit-identical), then the others; every candidate must pass a self-test once.
_BACKENDS = {"cpu": [_lse_cpu], "cuda": [_lse_cuda_auto, _lse_cuda_flash, _lse_cuda_efficient]}
_CHOICE: dict[tuple, object] = {}
_CHOICE_LOCK = threading.Lock()


def _self_test(fn, device: torch.device, dtype: torch.dtype, masked: bool) -> bool:
    """Check a private op against the explicit fallback once per (device, dtype, masked)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(device, dtype) for _ in range(3))
    mask = torch.arange(40, device=device).lt(37).view(1, 1, 1, 40) if masked else None  # the last 3 keys masked
    try:
        out, lse = fn(q, k, v, 0.3, mask)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    ref_out, ref_lse = _lse_explicit(q, k, v, 0.3, mask)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return (lse.shape == ref_lse.shape and torch.allclose(lse.float(), ref_lse, atol=tol, rtol=tol)
            and torch.allclose(out.float(), ref_out.float(), atol=tol, rtol=tol))


def lse_backend(device: torch.device, dtype: torch.dtype, masked: bool = False):
    """The (out, lse) function for this device and dtype: a fused private op that passed its
    self-test, else the explicit chunked fallback (with one warning)."""
    key = (device.type, dtype, masked)
    if key not in _CHOICE:
        with _CHOICE_LOCK:
            if key not in _CHOICE:
                fn = next((c for c in _BACKENDS.get(device.type, []) if _self_test(c, device, dtype, masked)), None)
                if fn is None:
                    warnings.warn(f"taca-probe: no fused attention kernel returns the log-sum-exp on "
                                  f"{device.type}/{dtype}; using the slower explicit fallback", stacklevel=3)
                _CHOICE[key] = fn or _lse_explicit
    return _CHOICE[key]


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                  attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention that also returns the natural-log log-sum-exp of the scaled logits.

    Returns
    -------
    out : (B, H, Lq, Dv), dtype of ``q``
    lse : (B, H, Lq), float32, ``logsumexp_j(scale * q.k_j + mask_j)``
    """
    out, lse = lse_backend(q.device, q.dtype, attn_mask is not None)(q, k, v, scale, attn_mask)
    return out, lse.float()


def _mask_part(attn_mask: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    """Slice a broadcastable (.., Lq or 1, Lk or 1) mask to a query/key block."""
    if attn_mask is None:
        return None
    m = attn_mask[..., rows, :] if attn_mask.shape[-2] > 1 else attn_mask
    return m[..., cols] if m.shape[-1] > 1 else m


def taca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: JointLayout, gamma: float, *,
                   scale: float | None = None, attn_mask: torch.Tensor | None = None, with_parts: bool = False):
    """Joint attention with the visual-query -> text-key logits multiplied by ``gamma``.

    At ``gamma != 1`` visual queries take one fused call over keys whose text rows are multiplied
    by gamma, text queries one stock call; at ``gamma == 1`` it is one stock call.

    Parameters
    ----------
    q, k, v
        ``(B, H, S, D)`` joint sequences, in the order of ``layout``.
    gamma
        Temperature on visual->text logits; must be > 0.
    scale
        The model's softmax scale (``None``: ``1/sqrt(D)``).
    attn_mask
        Optional boolean or additive mask broadcastable to ``(B, H, S, S)``.
    with_parts
        Also return what the statistics need.

    Returns
    -------
    out : (B, H, S, D)
    parts : dict, only with ``with_parts``
        ``lse_vis`` (B, H, N_vis) and ``lse_txt`` (B, H, N_txt) fp32: each query's log-sum-exp
        over all keys of its applied logits, so any key's probability is ``exp(logit - lse)``.
    """
    if not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
    if gamma == 1.0 and not with_parts:
        # The stock kernel: bit-identical to diffusers' own call.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    txt, vis = layout.split(q.shape[2])

    if gamma == 1.0:  # measuring without intervening: the stock kernel, with its log-sum-exp
        out, lse = sdpa_with_lse(q, k, v, scale=scale, attn_mask=attn_mask)
        return out, {"lse_vis": lse[:, :, vis], "lse_txt": lse[:, :, txt]}
    # The text keys times gamma, rounded once to the keys' dtype: exact to 6e-8 in fp32; in bf16
    # within the stock kernel's own error (the accuracy tests check against float64).
    k_txt = k[:, :, txt] * gamma
    k_applied = torch.cat((k_txt, k[:, :, vis]) if layout.txt_first else (k[:, :, vis], k_txt), dim=2)
    mask_v, mask_t = _mask_part(attn_mask, vis, slice(None)), _mask_part(attn_mask, txt, slice(None))
    attend = sdpa_with_lse if with_parts else lambda *a, **kw: (F.scaled_dot_product_attention(*a, **kw), None)
    o_v, lse_v = attend(q[:, :, vis], k_applied, v, scale=scale, attn_mask=mask_v)
    o_t, lse_t = attend(q[:, :, txt], k, v, scale=scale, attn_mask=mask_t)
    out = torch.cat((o_t, o_v) if layout.txt_first else (o_v, o_t), dim=2)
    return (out, {"lse_vis": lse_v, "lse_txt": lse_t}) if with_parts else out


def _token_sums(q_v, k_t, lse_vis, scale, mask_vt):
    """``sum_i exp(scale * q_i.k_j - lse_i)`` over visual queries i, per text key j: (B, H, N_txt).

    One fused call with the roles swapped, each visual query carrying ``w_i = exp(c - lse_i)`` as
    its value: it returns ``sum_i softmax_i(logit_ij) w_i`` and ``LSE_j``, so the sum is
    ``exp(log(out_j) + LSE_j - c)``.
    """
    # In fp32 whatever the inputs (bf16/fp16 convert exactly): half-precision weights and outputs
    # span only about e^-17..e^11, so queries whose lse lies ~27 above the smallest dropped out.
    c = lse_vis.amin(dim=-1, keepdim=True)  # (B, H, 1): the weights are <= 1
    w = torch.exp(c - lse_vis)  # (B, H, N_vis)
    values = w.unsqueeze(-1).expand(*w.shape, q_v.shape[-1]).contiguous()
    mask = None if mask_vt is None else mask_vt.transpose(-1, -2)
    out, lse_j = sdpa_with_lse(k_t.float(), q_v.float(), values, scale=scale, attn_mask=mask)
    sums = torch.exp(torch.log(out[..., 0]) + lse_j - c)
    return torch.where(torch.isneginf(lse_j), 0.0, sums)  # a text key no visual query may see


STATS_BACKENDS = ("triton", "fused", "block")


def stats_backend(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The statistics path on ``device``: on CUDA ``triton`` where Triton is installed and its kernel
    passes a self-test for ``dtype``, else ``fused``; ``block`` elsewhere (an fp32 logit block, the
    faster way on the CPU). ``TACA_PROBE_STATS`` = ``triton``, ``fused`` or ``block`` overrides it."""
    forced = os.environ.get("TACA_PROBE_STATS", "").strip().lower()
    if forced:
        if forced not in STATS_BACKENDS:
            raise ValueError(f"TACA_PROBE_STATS={forced!r}; choose from {', '.join(STATS_BACKENDS)}")
        return forced
    if device.type != "cuda":
        return "block"
    return "triton" if _triton_ok(device, dtype) else "fused"


_TRITON_OK: dict[tuple, bool] = {}


def _triton_ok(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Triton installed, and its kernel agrees with an explicit computation once per device and dtype."""
    if not triton_stats.available(device):
        return False
    if dtype is None:
        return True
    key = (device.type, dtype)
    if key not in _TRITON_OK:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k = (torch.randn(1, 2, 70, 64, generator=g).to(device, dtype) for _ in range(2))
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * 0.2
        lse = torch.logsumexp(s, dim=-1) + 0.3
        p = torch.exp(s - lse[..., None])
        try:
            rows, cols = triton_stats.text_sums(q, k[:, :, :19], lse, 0.2)
            p = p[..., :19]
            ok = torch.allclose(rows, p.sum(-1), rtol=1e-3, atol=1e-5) and torch.allclose(
                cols, p.sum(dim=(1, 2)), rtol=1e-3, atol=1e-5)
        except Exception as e:  # a compiler or driver that refuses the kernel: use the fused path
            warnings.warn(f"taca-probe: the Triton statistics kernel failed its self-test ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); using the fused path", stacklevel=3)
            ok = False
        _TRITON_OK[key] = bool(ok)
    return _TRITON_OK[key]


def describe_stats_backend(device: torch.device, dtype: torch.dtype) -> str:
    """One line for a store's attributes: the statistics path and the log-sum-exp kernel behind it."""
    kernel = lse_backend(device, dtype).__name__.removeprefix("_lse_").replace("_", "-")
    return f"{stats_backend(device, dtype)} (lse: {kernel})"


def attention_statistics(q: torch.Tensor, k: torch.Tensor, layout: JointLayout, gamma: float, parts: dict, *,
                         scale: float | None = None, attn_mask: torch.Tensor | None = None,
                         map_tokens: torch.Tensor | None = None, block_bytes: int = 64 << 20,
                         backend: str | None = None) -> dict[str, torch.Tensor]:
    """Cross-modal attention statistics of one call, on the device, without the N x N matrix.

    Three paths give the same numbers (all tested against the float64 reference): ``triton`` (one
    Triton kernel pass), ``fused`` (fused attention calls only) and ``block`` (an fp32 visual-query x
    text-key block, a few heads at a time, at most ``block_bytes``); ``None`` picks :func:`stats_backend`.

    Parameters
    ----------
    q, k
        ``(B, H, S, D)`` as given to the attention call.
    layout, gamma, scale, attn_mask
        As for :func:`taca_attention`.
    parts
        The ``parts`` that :func:`taca_attention` returned for this call.
    map_tokens
        Optional long tensor of text-token indices whose per-image-token maps to return.

    Returns
    -------
    dict of fp32 tensors
        ``vis_txt_mass`` (B, H): mean over visual queries of the probability on text keys, as
        applied; ``vis_txt_mass_ref`` (B, H): the same at gamma = 1 on these activations;
        ``txt_vis_mass`` (B, H): mean over text queries of the probability on visual keys;
        ``token_mass`` (B, N_txt): mean over heads and visual queries of the probability on each
        text token; ``maps`` (B, N_vis, len(map_tokens)) head-mean probabilities, if asked.
    """
    backend = backend or stats_backend(q.device, q.dtype)
    if backend not in STATS_BACKENDS:
        raise ValueError(f"unknown statistics backend {backend!r}; choose from {', '.join(STATS_BACKENDS)}")
    # the kernel knows no masks (neither SD3 nor FLUX passes one) and only some head sizes (the self-test's is 64)
    if backend == "triton" and (attn_mask is not None or q.shape[-1] not in triton_stats.HEAD_DIMS):
        backend = "fused"
    txt, vis = layout.split(q.shape[2])
    base = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    fn = {"triton": _statistics_triton, "fused": _statistics_fused, "block": _statistics_block}[backend]
    return fn(q[:, :, vis], q[:, :, txt], k, txt, vis, base, gamma, parts, attn_mask, map_tokens, block_bytes)


def _lse_visual_keys(q_v, k, vis, base, attn_mask):
    """Each visual query's lse over the visual keys alone (one fused call; needed at gamma != 1).

    Taken directly: recovering it as lse_all + log(1 - mass) cancels catastrophically for queries
    that attend mostly to text, and in bf16 would carry the output's rounded gamma * k.
    """
    k_v = k[:, :, vis]
    return sdpa_with_lse(q_v, k_v, k_v, scale=base, attn_mask=_mask_part(attn_mask, vis, vis))[1]


def _lse_visual_keys_from_total(q_v, k_t, lse_all, scale, mask_vt):
    """The visual keys' lse as ``lse_all + log(1 - mass)`` (one call over the text keys), where exact, else None.

    Exact only on the CPU in fp32 (deciding reads the values on the host, free there; ``gamma * k``
    is exact in fp32) while every text mass is <= 1/2 (the subtraction amplifies rounding at most 2x).
    """
    if q_v.device.type != "cpu" or q_v.dtype != torch.float32:
        return None
    _, lse_t = sdpa_with_lse(q_v, k_t, k_t, scale=scale, attn_mask=mask_vt)
    log_mass = lse_t - lse_all
    if float(log_mass.max()) > -math.log(2.0):
        return None
    return lse_all + torch.log(-torch.expm1(log_mass))


def _statistics_block(q_v, q_t, k, txt, vis, base, gamma, parts, attn_mask, map_tokens, block_bytes):
    """The statistics from an fp32 visual-query x text-key logit block, a few heads at a time."""
    B, H, n_vis = q_v.shape[:3]
    k_t = k[:, :, txt]
    n_txt = k_t.shape[2]
    mask_vt, mask_tt = _mask_part(attn_mask, vis, txt), _mask_part(attn_mask, txt, txt)
    lse_vv = None
    if gamma != 1.0:
        lse_vv = _lse_visual_keys_from_total(q_v, k_t, parts["lse_vis"], base * gamma, mask_vt)
        if lse_vv is None:
            lse_vv = _lse_visual_keys(q_v, k, vis, base, attn_mask)

    # Text queries: their mass on visual keys is 1 - (their mass on text keys).
    s_tt = torch.matmul(q_t.float(), k_t.float().transpose(-1, -2)).mul_(base)  # (B, H, N_txt, N_txt)
    if mask_tt is not None:
        s_tt = s_tt + _additive_mask(mask_tt, torch.float32)
    txt_vis = (-torch.expm1(torch.logsumexp(s_tt, dim=-1) - parts["lse_txt"])).mean(-1)  # (B, H)
    del s_tt

    token_sum = q_v.new_zeros((B, n_txt), dtype=torch.float32)
    vis_txt = q_v.new_empty((B, H), dtype=torch.float32)
    maps = None if map_tokens is None else q_v.new_zeros((B, n_vis, len(map_tokens)), dtype=torch.float32)
    ref = []
    step = max(1, block_bytes // max(1, B * n_vis * n_txt * 4))
    for h0 in range(0, H, step):
        hs = slice(h0, h0 + step)
        s = torch.matmul(q_v[:, hs].float(), k_t[:, hs].float().transpose(-1, -2)).mul_(base)  # (B, h, N_vis, N_txt)
        if mask_vt is not None:
            s = s + _additive_mask(mask_vt, torch.float32)
        if gamma == 1.0:
            lse_all = parts["lse_vis"][:, hs]
        else:
            ref.append(torch.sigmoid(torch.logsumexp(s, dim=-1) - lse_vv[:, hs]).mean(-1))
            lse_all = torch.logaddexp(torch.logsumexp(s * gamma, dim=-1), lse_vv[:, hs])
        p = s.mul_(gamma).sub_(lse_all[..., None]).exp_()  # applied probabilities of the text keys
        vis_txt[:, hs] = p.sum(dim=-1).mean(-1)
        token_sum += p.sum(dim=(1, 2))
        if maps is not None:
            maps += p[..., map_tokens].sum(dim=1)
        del s, p
    out = {"vis_txt_mass": vis_txt, "vis_txt_mass_ref": torch.cat(ref, dim=1) if ref else vis_txt,
           "txt_vis_mass": txt_vis, "token_mass": token_sum / (H * n_vis)}
    if maps is not None:
        out["maps"] = maps / H
    return out


def _statistics_triton(q_v, q_t, k, txt, vis, base, gamma, parts, attn_mask, map_tokens, block_bytes):
    """The statistics with one Triton pass over the visual-query x text-key tiles (no mask)."""
    H, n_vis = q_v.shape[1:3]
    k_t = k[:, :, txt]
    if gamma == 1.0:
        lse_vis = parts["lse_vis"]  # the stock call's own
        rows, cols = triton_stats.text_sums(q_v, k_t, lse_vis, base)
        vis_txt = ref = rows.mean(-1)
    else:
        # Against the visual keys' lse, the row sums are exp(L_t - L_v): the masses' odds.
        lse_vv = _lse_visual_keys(q_v, k, vis, base, None)
        odds, _ = triton_stats.text_sums(q_v, k_t, lse_vv, base * gamma, columns=False)
        odds1, _ = triton_stats.text_sums(q_v, k_t, lse_vv, base, columns=False)
        lse_vis = lse_vv + torch.log1p(odds)
        vis_txt = (odds / (1 + odds)).mean(-1)
        ref = (odds1 / (1 + odds1)).mean(-1)
        _, cols = triton_stats.text_sums(q_v, k_t, lse_vis, base * gamma)
    _, lse_tt = sdpa_with_lse(q_t, k_t, k_t, scale=base)
    txt_vis = (-torch.expm1(lse_tt - parts["lse_txt"])).mean(-1)
    out = {"vis_txt_mass": vis_txt, "vis_txt_mass_ref": ref, "txt_vis_mass": txt_vis,
           "token_mass": cols / (H * n_vis)}
    if map_tokens is not None:
        out["maps"] = _maps(q_v, k_t, lse_vis, base * gamma, None, map_tokens, block_bytes)
    return out


def _statistics_fused(q_v, q_t, k, txt, vis, base, gamma, parts, attn_mask, map_tokens, block_bytes):
    """The statistics from small fused calls that return their log-sum-exp, without any logit block.

    At gamma != 1 the visual queries' text and visual parts are taken apart with gamma in the fp32
    scale (the paper's equation exactly, also in bf16, where the output's keys carry gamma rounded),
    and once more at gamma = 1 for the counterfactual. Only the maps form a (selected-token) block.
    """
    H, n_vis = q_v.shape[1:3]
    k_t = k[:, :, txt]
    mask_vt = _mask_part(attn_mask, vis, txt)
    # Visual queries: mass on text keys from the lse over text keys and the lse over all keys.
    _, lse_vt = sdpa_with_lse(q_v, k_t, k_t, scale=base * gamma, attn_mask=mask_vt)
    if gamma == 1.0:
        lse_vis = parts["lse_vis"]  # the stock call's own
        vis_txt = ref = torch.exp(lse_vt - lse_vis).mean(-1)
    else:
        lse_vv = _lse_visual_keys(q_v, k, vis, base, attn_mask)
        _, lse_vt1 = sdpa_with_lse(q_v, k_t, k_t, scale=base, attn_mask=mask_vt)
        lse_vis = torch.logaddexp(lse_vt, lse_vv)
        vis_txt = torch.sigmoid(lse_vt - lse_vv).mean(-1)
        ref = torch.sigmoid(lse_vt1 - lse_vv).mean(-1)
    # Text queries: their mass on visual keys is 1 - (their mass on text keys).
    _, lse_tt = sdpa_with_lse(q_t, k_t, k_t, scale=base, attn_mask=_mask_part(attn_mask, txt, txt))
    txt_vis = (-torch.expm1(lse_tt - parts["lse_txt"])).mean(-1)
    token = _token_sums(q_v, k_t, lse_vis, base * gamma, mask_vt).sum(dim=1) / (H * n_vis)  # (B, N_txt)
    out = {"vis_txt_mass": vis_txt, "vis_txt_mass_ref": ref, "txt_vis_mass": txt_vis, "token_mass": token}
    if map_tokens is not None:
        out["maps"] = _maps(q_v, k_t, lse_vis, base * gamma, mask_vt, map_tokens, block_bytes)
    return out


def _maps(q_v, k_t, lse_vis, scale, mask_vt, map_tokens, block_bytes):
    """Head-mean probability of each visual query on each selected text key: (B, N_vis, n_sel)."""
    B, H, n_vis = q_v.shape[:3]
    k_sel = k_t[:, :, map_tokens].float()
    mask = None if mask_vt is None else _additive_mask(_mask_part(mask_vt, slice(None), map_tokens), torch.float32)
    maps = q_v.new_zeros((B, n_vis, len(map_tokens)), dtype=torch.float32)
    step = max(1, block_bytes // max(1, B * n_vis * len(map_tokens) * 4))
    for h0 in range(0, H, step):
        hs = slice(h0, h0 + step)
        s = torch.matmul(q_v[:, hs].float(), k_sel[:, hs].transpose(-1, -2)).mul_(scale)  # (B, h, N_vis, n_sel)
        if mask is not None:
            s = s + (mask[:, hs] if mask.shape[1] > 1 else mask)
        maps += s.sub_(lse_vis[:, hs, :, None]).exp_().sum(dim=1)
    return maps / H
