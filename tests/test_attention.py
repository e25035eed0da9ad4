"""taca_attention against the explicit-softmax reference of the paper's equation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taca_probe.attention import JointLayout, _lse_explicit, sdpa_with_lse, taca_attention
from tests.reference import taca_output, taca_probabilities, text_mask

GAMMAS = [1.0, 1.2, 2.0, 0.7]


def _qkv(b=2, h=3, s=70, d=16, *, seed=0, spread=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, h, s, d, generator=g) * spread).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("txt_first", [True, False], ids=["txt_first", "img_first"])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_output_matches_explicit_softmax(txt_first, gamma):
    q, k, v = _qkv()
    layout = JointLayout(n_txt=13, txt_first=txt_first)
    ref = taca_output(q, k, v, 13, txt_first, gamma)
    out = taca_attention(q, k, v, layout, gamma)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert (out.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("gamma", GAMMAS)
def test_parts_are_the_reference_masses_and_lse(gamma):
    q, k, v = _qkv(seed=1)
    layout = JointLayout(n_txt=9, txt_first=False)
    out, parts = taca_attention(q, k, v, layout, gamma, with_parts=True)
    p = taca_probabilities(q, k, 9, False, gamma)
    is_txt = text_mask(70, 9, False)
    # Per-key probability recovered from the lse: exp(applied logit - lse), for visual queries.
    s = (q.double() @ k.double().transpose(-1, -2)) * 16**-0.5
    logit_vt = gamma * s[:, :, ~is_txt][..., is_txt]
    p_vt = torch.exp(logit_vt - parts["lse_vis"].double()[..., None])
    assert (p_vt - p[:, :, ~is_txt][..., is_txt]).abs().max().item() <= 1e-5
    p_tv = torch.exp(s[:, :, is_txt][..., ~is_txt] - parts["lse_txt"].double()[..., None])
    assert (p_tv - p[:, :, is_txt][..., ~is_txt]).abs().max().item() <= 1e-5
    assert (out.double() - p @ v.double()).abs().max().item() <= 1e-5


def test_gamma_one_is_the_stock_kernel_bit_for_bit():
    q, k, v = _qkv(seed=2)
    stock = F.scaled_dot_product_attention(q, k, v)
    layout = JointLayout(n_txt=20, txt_first=True)
    assert torch.equal(taca_attention(q, k, v, layout, 1.0), stock)
    # Measuring at gamma = 1 must not change the output either.
    out, _ = taca_attention(q, k, v, layout, 1.0, with_parts=True)
    assert torch.equal(out, stock)


def test_custom_scale_reaches_every_partial_call():
    q, k, v = _qkv(seed=3)
    layout = JointLayout(n_txt=11, txt_first=True)
    ref = taca_output(q, k, v, 11, True, 1.3, scale=0.05)
    out = taca_attention(q, k, v, layout, 1.3, scale=0.05)
    assert (out.double() - ref).abs().max().item() <= 1e-5
    # and it is not the default scale's answer
    assert (out.double() - taca_output(q, k, v, 11, True, 1.3)).abs().max().item() > 1e-3


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_mask_is_split_with_the_keys(kind):
    q, k, v = _qkv(b=2, h=2, s=40, seed=4)
    keep = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    keep[0, ..., 3:6] = False  # mask three text keys of sample 0
    keep[1, ..., 30:] = False  # and ten image keys of sample 1
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    layout = JointLayout(n_txt=8, txt_first=True)
    ref = taca_output(q, k, v, 8, True, 1.5, attn_mask=mask)
    out = taca_attention(q, k, v, layout, 1.5, attn_mask=mask)
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_bf16_close_to_reference():
    q, k, v = _qkv(s=96, d=32, seed=5, spread=1.0, dtype=torch.bfloat16)
    ref = taca_output(q, k, v, 24, True, 1.2)
    out = taca_attention(q, k, v, JointLayout(24, True), 1.2)
    assert out.dtype == torch.bfloat16
    stock_err = (F.scaled_dot_product_attention(q, k, v).double() - taca_output(q, k, v, 24, True, 1.0)).abs().max()
    # Within a few bf16 ulps of the exact answer, like the stock kernel itself.
    assert (out.double() - ref).abs().max().item() <= max(4 * stock_err.item(), 2e-2)


def test_lse_ops_agree_with_explicit_fallback():
    q, k, v = _qkv(seed=6)
    out, lse = sdpa_with_lse(q, k, v, scale=0.2)
    ref_out, ref_lse = _lse_explicit(q, k, v, 0.2, None, chunk=17)  # odd chunk: exercises the loop
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.2
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max().item() <= 1e-5
    assert (ref_lse.double() - torch.logsumexp(s, -1)).abs().max().item() <= 1e-5
    assert (out - ref_out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_gamma_refused(bad):
    q, k, v = _qkv(b=1, h=1, s=10)
    with pytest.raises(ValueError, match="gamma"):
        taca_attention(q, k, v, JointLayout(3, True), bad)


def test_layout_must_fit_the_sequence():
    q, k, v = _qkv(b=1, h=1, s=10)
    with pytest.raises(ValueError, match="does not fit"):
        taca_attention(q, k, v, JointLayout(10, True), 1.2)


def test_the_wrong_shortcut_is_wrong():
    # Scaling the visual queries by gamma also scales visual->visual logits: the reference must
    # tell it apart from TACA, or these tests would not catch that mistake.
    q, k, v = _qkv(seed=7)
    layout = JointLayout(10, False)
    _, vis = layout.split(70)
    q2 = q.clone()
    q2[:, :, vis] *= 1.5
    wrong = F.scaled_dot_product_attention(q2, k, v)
    assert (wrong.double() - taca_output(q, k, v, 10, False, 1.5)).abs().max().item() > 1e-2
