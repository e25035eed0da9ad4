"""Independent references for the tests: the paper's equation with an explicit softmax.

Nothing here imports taca_probe. Everything is computed in float64 on the full N x N matrix, which
is fine at test sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def text_mask(seq: int, n_txt: int, txt_first: bool) -> torch.Tensor:
    """Boolean (seq,) vector, True at text positions."""
    is_txt = torch.zeros(seq, dtype=torch.bool)
    if txt_first:
        is_txt[:n_txt] = True
    else:
        is_txt[seq - n_txt :] = True
    return is_txt


def taca_probabilities(q, k, n_txt, txt_first, gamma, scale=None, attn_mask=None):
    """P = softmax(gamma_ij * s_ij) with gamma_ij = gamma for (visual query, text key), else 1.

    q, k: (B, H, S, D). Returns (B, H, S, S) float64.
    """
    q, k = q.double(), k.double()
    seq = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    is_txt = text_mask(seq, n_txt, txt_first).to(q.device)
    g = torch.ones(seq, seq, dtype=torch.float64, device=q.device)
    g[(~is_txt)[:, None] & is_txt[None, :]] = gamma
    logits = s * g
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.double()
    return torch.softmax(logits, dim=-1)


def taca_output(q, k, v, n_txt, txt_first, gamma, scale=None, attn_mask=None):
    """Explicit-softmax TACA attention output, float64 (B, H, S, Dv)."""
    return taca_probabilities(q, k, n_txt, txt_first, gamma, scale, attn_mask) @ v.double()


class ExplicitTacaSDPA(TorchFunctionMode):
    """Replace F.scaled_dot_product_attention with the explicit reference (test-only).

    Used to run diffusers' *stock* processor with the paper's equation in place of its attention
    call, so that a TACA processor can be compared on the very same activations.
    """

    def __init__(self, n_txt: int, txt_first: bool, gamma: float):
        super().__init__()
        self.n_txt, self.txt_first, self.gamma = n_txt, txt_first, gamma
        self.calls = 0
        self.probabilities: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        a = dict(zip(names, args))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        p = taca_probabilities(q, k, self.n_txt, self.txt_first, self.gamma, a.get("scale"), a.get("attn_mask"))
        self.probabilities.append(p)
        return (p @ v.double()).to(q.dtype)
