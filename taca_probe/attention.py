"""The attention math of TACA, on fused kernels, without the N x N matrix.

The joint attention of an MM-DiT runs one softmax over the concatenated text and image tokens.
TACA multiplies the logits of visual-query -> text-key pairs by ``gamma``. For a visual query ``i``
split its keys into the text part and the visual part and take the log-sum-exp of each::

    L_t(i) = logsumexp_j(gamma * s_ij)   over text keys      (one fused call, scale * gamma)
    L_v(i) = logsumexp_j(s_ij)           over visual keys    (one fused call, scale)
    m_i    = sigmoid(L_t - L_v)                              (visual->text attention mass)
    out_i  = m_i * O_t(i) + (1 - m_i) * O_v(i)               (merge of the partial outputs)

which is exactly ``softmax([gamma * s_vt, s_vv]) @ V``, the paper's equation. Text queries are
unchanged and take one stock call over all keys. The work is the same as one full attention call.

``gamma`` enters the kernel's fp32 ``scale`` argument, never the keys: scaling bf16 keys rounds them.
At ``gamma == 1`` with nothing to measure the stock kernel is called as is, so the output is
bit-identical to stock diffusers.

Tensor layout everywhere in this module is SDPA's: ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["JointLayout", "sdpa_with_lse", "taca_attention", "attention_statistics", "lse_backend"]


@dataclass(frozen=True)
class JointLayout:
    """Where the text tokens sit in a joint sequence.

    Parameters
    ----------
    n_txt
        Number of text tokens, read from the actual inputs of the call.
    txt_first
        True for FLUX (``[txt, img]``), False for SD3 (``[img, txt]``).
    """

    n_txt: int
    txt_first: bool

    def split(self, seq_len: int) -> tuple[slice, slice]:
        """Return ``(txt, vis)`` slices over a sequence of ``seq_len`` tokens."""
        if not 0 < self.n_txt < seq_len:
            raise ValueError(
                f"text length {self.n_txt} does not fit a joint sequence of {seq_len} tokens"
            )
        if self.txt_first:
            return slice(0, self.n_txt), slice(self.n_txt, seq_len)
        n_vis = seq_len - self.n_txt
        return slice(n_vis, seq_len), slice(0, n_vis)


# --------------------------------------------------------------------------------------------
# Fused attention that also returns the log-sum-exp
# --------------------------------------------------------------------------------------------


def _lse_cpu(q, k, v, scale, attn_mask):
    # Same kernel as F.scaled_dot_product_attention on CPU; returns (out, lse (B, H, L) fp32).
    # It takes additive masks of the query's dtype only.
    if attn_mask is not None:
        attn_mask = _additive_mask(attn_mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
    )[:2]
    return out, lse


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
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, False, scale=scale
    )
    # The memory-efficient kernel pads the lse to a multiple of 32 queries.
    return res[0], res[1][..., : q.shape[2]]


def _additive_mask(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            ~attn_mask, float("-inf")
        )
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
    mask = None
    if masked:
        mask = torch.ones(1, 1, 1, 40, dtype=torch.bool, device=device)
        mask[..., -3:] = False
    try:
        out, lse = fn(q, k, v, 0.3, mask)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    ref_out, ref_lse = _lse_explicit(q, k, v, 0.3, mask)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return (
        lse.shape == ref_lse.shape
        and torch.allclose(lse.float(), ref_lse, atol=tol, rtol=tol)
        and torch.allclose(out.float(), ref_out.float(), atol=tol, rtol=tol)
    )


def lse_backend(device: torch.device, dtype: torch.dtype, masked: bool = False):
    """The function used for (out, lse) on this device and dtype: a fused private op that passed
    its self-test, else the explicit chunked fallback (with one warning)."""
    key = (device.type, dtype, masked)
    fn = _CHOICE.get(key)
    if fn is None:
        with _CHOICE_LOCK:
            fn = _CHOICE.get(key)
            if fn is None:
                fn = next(
                    (c for c in _BACKENDS.get(device.type, []) if _self_test(c, device, dtype, masked)),
                    None,
                )
                if fn is None:
                    warnings.warn(
                        f"taca-probe: no fused attention kernel returns the log-sum-exp on "
                        f"{device.type}/{dtype}; using the slower explicit fallback",
                        stacklevel=3,
                    )
                    fn = _lse_explicit
                _CHOICE[key] = fn
    return fn


def sdpa_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention that also returns the natural-log log-sum-exp of the scaled logits.

    Returns
    -------
    out : (B, H, Lq, Dv), dtype of ``q``
    lse : (B, H, Lq), float32, ``logsumexp_j(scale * q.k_j + mask_j)``
    """
    fn = lse_backend(q.device, q.dtype, attn_mask is not None)
    out, lse = fn(q, k, v, scale, attn_mask)
    return out, lse.float()


# --------------------------------------------------------------------------------------------
# TACA
# --------------------------------------------------------------------------------------------


def _mask_part(attn_mask: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    """Slice a broadcastable (.., Lq or 1, Lk or 1) mask to a query/key block."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.shape[-2] > 1:
        m = m[..., rows, :]
    if m.shape[-1] > 1:
        m = m[..., cols]
    return m


def taca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: JointLayout,
    gamma: float,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    with_parts: bool = False,
):
    """Joint attention with the visual-query -> text-key logits multiplied by ``gamma``.

    Parameters
    ----------
    q, k, v
        ``(B, H, S, D)`` joint sequences (text and image tokens, in the order of ``layout``).
    layout
        Where the text tokens are.
    gamma
        Temperature on visual->text logits; must be > 0.
    scale
        The model's softmax scale (``None``: ``1/sqrt(D)``), applied to every logit.
    attn_mask
        Optional boolean or additive mask broadcastable to ``(B, H, S, S)``.
    with_parts
        Also return the intermediate log-sum-exps for measuring (see Returns).

    Returns
    -------
    out : (B, H, S, D)
        The attention output.
    parts : dict, only with ``with_parts``
        ``lse_vis`` (B, H, N_vis) and ``lse_txt`` (B, H, N_txt) fp32:
        each query's log-sum-exp over all keys of its applied logits, so that the probability of
        any key is ``exp(applied logit - lse)`` without forming the matrix; ``lse_vv``
        (B, H, N_vis) fp32 over visual keys only (None at gamma = 1, where it is not needed).
    """
    if not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
    if gamma == 1.0 and not with_parts:
        # The stock kernel: bit-identical to diffusers' own call.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    txt, vis = layout.split(q.shape[2])
    base = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_v = q[:, :, vis]

    if gamma == 1.0:
        # Measuring without intervening: the stock kernel over all keys (same output as stock),
        # with its log-sum-exp; the probe forms the small visual x text block itself.
        out, lse = sdpa_with_lse(q, k, v, scale=scale, attn_mask=attn_mask)
        return out, {"lse_vis": lse[:, :, vis], "lse_txt": lse[:, :, txt], "lse_vv": None}

    # Visual queries: two partial calls (text keys at scale*gamma, visual keys at scale).
    o_vt, lse_vt = sdpa_with_lse(q_v, k[:, :, txt], v[:, :, txt], scale=base * gamma,
                                 attn_mask=_mask_part(attn_mask, vis, txt))
    o_vv, lse_vv = sdpa_with_lse(q_v, k[:, :, vis], v[:, :, vis], scale=base,
                                 attn_mask=_mask_part(attn_mask, vis, vis))
    mass = torch.sigmoid(lse_vt - lse_vv)  # (B, H, N_vis) fp32

    out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, H, S, Dv)
    # Merge in fp32, then round once to the output dtype.
    out[:, :, vis] = torch.lerp(o_vv.float(), o_vt.float(), mass.unsqueeze(-1)).to(out.dtype)

    # Text queries: unchanged, one call over all keys.
    mask_t = _mask_part(attn_mask, txt, slice(None))
    if not with_parts:
        out[:, :, txt] = F.scaled_dot_product_attention(q[:, :, txt], k, v, attn_mask=mask_t, scale=scale)
        return out
    out[:, :, txt], lse_txt = sdpa_with_lse(q[:, :, txt], k, v, scale=scale, attn_mask=mask_t)
    return out, {"lse_vis": torch.logaddexp(lse_vt, lse_vv), "lse_txt": lse_txt, "lse_vv": lse_vv}


# --------------------------------------------------------------------------------------------
# Statistics for the probe, from the parts of the same call
# --------------------------------------------------------------------------------------------


def attention_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: JointLayout,
    gamma: float,
    parts: dict,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    map_tokens: torch.Tensor | None = None,
    block_bytes: int = 64 << 20,
) -> dict[str, torch.Tensor]:
    """Cross-modal attention statistics of one call, on the device, without the N x N matrix.

    Only the small visual-query x text-key logit block is formed, a few heads at a time
    (at most ``block_bytes`` of fp32), plus the text x text block.

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
    txt, vis = layout.split(q.shape[2])
    base = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    B, H = q.shape[:2]
    q_v, q_t, k_t = q[:, :, vis], q[:, :, txt], k[:, :, txt]
    n_vis, n_txt = q_v.shape[2], k_t.shape[2]
    mask_vt = _mask_part(attn_mask, vis, txt)
    mask_tt = _mask_part(attn_mask, txt, txt)

    # Text queries: their mass on visual keys is 1 - (their mass on text keys).
    s_tt = torch.matmul(q_t.float(), k_t.float().transpose(-1, -2)).mul_(base)  # (B, H, N_txt, N_txt)
    if mask_tt is not None:
        s_tt = s_tt + _additive_mask(mask_tt, torch.float32)
    txt_vis = (-torch.expm1(torch.logsumexp(s_tt, dim=-1) - parts["lse_txt"])).mean(-1)  # (B, H)
    del s_tt

    token_sum = q.new_zeros((B, n_txt), dtype=torch.float32)
    vis_txt = q.new_empty((B, H), dtype=torch.float32)
    maps = None if map_tokens is None else q.new_zeros((B, n_vis, len(map_tokens)), dtype=torch.float32)
    ref = []
    step = max(1, block_bytes // max(1, B * n_vis * n_txt * 4))
    for h0 in range(0, H, step):
        hs = slice(h0, h0 + step)
        s = torch.matmul(q_v[:, hs].float(), k_t[:, hs].float().transpose(-1, -2)).mul_(base)  # (B, h, N_vis, N_txt)
        if mask_vt is not None:
            s = s + _additive_mask(mask_vt, torch.float32)
        if gamma != 1.0:
            ref.append(torch.sigmoid(torch.logsumexp(s, dim=-1) - parts["lse_vv"][:, hs]).mean(-1))
        # Applied probabilities of the text keys: exp(gamma * s - lse over all keys).
        p = s.mul_(gamma).sub_(parts["lse_vis"][:, hs, :, None]).exp_()
        per_query = p.sum(dim=-1)  # (B, h, N_vis): each visual query's mass on text keys
        vis_txt[:, hs] = per_query.mean(-1)
        token_sum += p.sum(dim=(1, 2))
        if maps is not None:
            maps += p[..., map_tokens].sum(dim=1)
        del s, p
    out = {
        "vis_txt_mass": vis_txt,
        "vis_txt_mass_ref": torch.cat(ref, dim=1) if ref else vis_txt,
        "txt_vis_mass": txt_vis,
        "token_mass": token_sum / (H * n_vis),
    }
    if maps is not None:
        out["maps"] = maps / H
    return out
