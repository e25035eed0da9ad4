"""taca_attention against the explicit-softmax reference of the paper's equation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from taca_probe.attention import (
    JointLayout,
    _lse_explicit,
    attention_statistics,
    sdpa_with_lse,
    stats_backend,
    taca_attention,
)
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


# ------------------------------------------------------------------------------------------------
# The statistics path (no logit block) against the explicit reference, where it is hardest
# ------------------------------------------------------------------------------------------------


def _reference_masses(q, k, n_txt, txt_first, gamma, attn_mask=None):
    p = taca_probabilities(q, k, n_txt, txt_first, gamma, attn_mask=attn_mask)
    p1 = taca_probabilities(q, k, n_txt, txt_first, 1.0, attn_mask=attn_mask)
    is_txt = text_mask(q.shape[2], n_txt, txt_first)
    p_vt = p[:, :, ~is_txt][..., is_txt]
    return {
        "vis_txt_mass": p_vt.sum(-1).mean(-1),
        "vis_txt_mass_ref": p1[:, :, ~is_txt][..., is_txt].sum(-1).mean(-1),
        "txt_vis_mass": p[:, :, is_txt][..., ~is_txt].sum(-1).mean(-1),
        "token_mass": p_vt.mean(dim=(1, 2)),
        "maps": p_vt.mean(1),
    }


BACKENDS = ["fused", "block", "triton"]



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("gamma", [1.0, 1.4])
def test_statistics_with_a_mask_match_the_reference(kind, gamma, backend):
    q, k, v = _qkv(b=2, h=2, s=40, seed=8)
    keep = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    keep[0, ..., 3:6] = False  # three text keys of sample 0: no query may see them
    keep[1, ..., 30:] = False  # ten image keys of sample 1
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    layout = JointLayout(n_txt=8, txt_first=True)
    _, parts = taca_attention(q, k, v, layout, gamma, attn_mask=mask, with_parts=True)
    tokens = torch.tensor([0, 4, 7])
    stats = attention_statistics(q, k, layout, gamma, parts, attn_mask=mask, map_tokens=tokens, backend=backend)
    ref = _reference_masses(q, k, 8, True, gamma, attn_mask=mask)
    for name in ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass", "token_mass"):
        assert (stats[name].double() - ref[name]).abs().max().item() <= 1e-5, name
    assert (stats["maps"].double() - ref["maps"][..., tokens]).abs().max().item() <= 1e-5
    assert stats["token_mass"][0, 3:6].abs().max().item() == 0.0  # masked keys get no mass


@pytest.mark.slow  # real-size shapes against the float64 reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 1.2])
def test_statistics_at_an_odd_shape_with_spread_out_logits(gamma, backend):
    # 301 text + 3969 = 63^2 image tokens at reduced heads; spread 3 gives lse values that differ
    # by tens across queries, which the token sums' weights must survive.
    g = torch.Generator().manual_seed(9)
    q, k = (torch.randn(1, 2, 301 + 3969, 32, generator=g) * 3 for _ in range(2))
    v = torch.randn(1, 2, 301 + 3969, 32, generator=g)
    layout = JointLayout(301, txt_first=False)
    _, parts = taca_attention(q, k, v, layout, gamma, with_parts=True)
    spread = (parts["lse_vis"].amax() - parts["lse_vis"].amin()).item()
    assert spread > 20
    stats = attention_statistics(q, k, layout, gamma, parts, backend=backend)
    ref = _reference_masses(q, k, 301, False, gamma)
    for name in ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass"):
        assert (stats[name].double() - ref[name]).abs().max().item() <= 1e-5, name
    rel = ((stats["token_mass"].double() - ref["token_mass"]).abs() / ref["token_mass"]).max().item()
    assert rel <= 1e-4
    assert torch.allclose(stats["token_mass"].sum(-1).double(), stats["vis_txt_mass"].mean(-1).double(), atol=1e-6)


@pytest.mark.slow  # real-size shapes against the float64 reference
@pytest.mark.parametrize("txt_first", [True, False], ids=["txt_first", "img_first"])
@pytest.mark.parametrize("gamma", [1.2, 1.3, 2.0])
def test_bf16_output_within_the_accuracy_contract(txt_first, gamma):
    # The contract: within twice the stock kernel's own error against the same float64 reference,
    # plus one bf16 ulp of the output's scale.
    q, k, v = _qkv(b=1, h=4, s=333 + 1024, d=64, seed=10, spread=1.5, dtype=torch.bfloat16)
    layout = JointLayout(333, txt_first)
    ref = taca_output(q, k, v, 333, txt_first, gamma)
    stock_err = (F.scaled_dot_product_attention(q, k, v).double() - taca_output(q, k, v, 333, txt_first, 1.0)).abs().max()
    out = taca_attention(q, k, v, layout, gamma)
    ulp = 2.0 ** -7 * 2.0 ** torch.floor(torch.log2(ref.abs().max())).item()
    assert (out.double() - ref).abs().max().item() <= 2 * stock_err.item() + ulp
    # with the parts (the probe's path) the output is the same tensor
    out2, _ = taca_attention(q, k, v, layout, gamma, with_parts=True)
    assert torch.equal(out, out2)


@pytest.mark.slow  # real-size shapes against the float64 reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 1.25])
def test_bf16_statistics_close_to_the_reference(gamma, backend):
    # Triton's CPU interpreter cannot read bf16 (numpy has none): half precision there, bf16 on CUDA
    # (tests/test_gpu.py).
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    q, k, v = _qkv(b=2, h=3, s=77 + 256, d=64, seed=11, spread=1.5, dtype=dtype)
    layout = JointLayout(77, txt_first=False)
    _, parts = taca_attention(q, k, v, layout, gamma, with_parts=True)
    tokens = torch.arange(0, 77, 5)
    stats = attention_statistics(q, k, layout, gamma, parts, map_tokens=tokens, backend=backend)
    ref = _reference_masses(q, k, 77, False, gamma)
    for name in ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass"):
        assert (stats[name].double() - ref[name]).abs().max().item() <= 2e-4, name
    assert (stats["token_mass"].double() - ref["token_mass"]).abs().max().item() <= 2e-5
    assert (stats["maps"].double() - ref["maps"][..., tokens]).abs().max().item() <= 2e-4


def test_default_statistics_backend_and_override(monkeypatch):
    assert stats_backend(torch.device("cpu")) == "block"
    triton_installed = importlib.util.find_spec("triton") is not None
    assert stats_backend(torch.device("cuda")) == ("triton" if triton_installed else "fused")
    monkeypatch.setenv("TACA_PROBE_STATS", "fused")
    assert stats_backend(torch.device("cpu")) == "fused"
    monkeypatch.setenv("TACA_PROBE_STATS", "nonsense")
    with pytest.raises(ValueError, match="TACA_PROBE_STATS"):
        stats_backend(torch.device("cpu"))


@pytest.mark.parametrize("spread,direct", [(1.0, False), (3.0, True)])
def test_block_path_takes_the_visual_keys_lse_directly_only_where_needed(spread, direct, monkeypatch):
    # On the CPU the block path derives the visual keys' lse from the total while every query's
    # text mass is <= 1/2, and asks a kernel for it otherwise; both must match the reference.
    import taca_probe.attention as A

    calls = []
    real = A._lse_visual_keys
    monkeypatch.setattr(A, "_lse_visual_keys", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(12)
    q, k = (torch.randn(1, 2, 40 + 300, 32, generator=g) * spread for _ in range(2))
    v = torch.randn(1, 2, 340, 32, generator=g)
    layout = JointLayout(40, txt_first=True)
    _, parts = taca_attention(q, k, v, layout, 1.3, with_parts=True)
    stats = attention_statistics(q, k, layout, 1.3, parts, backend="block")
    assert bool(calls) == direct
    ref = _reference_masses(q, k, 40, True, 1.3)
    for name in ("vis_txt_mass", "vis_txt_mass_ref", "token_mass"):
        assert (stats[name].double() - ref[name]).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("txt_first", [True, False], ids=["txt_first", "img_first"])
@pytest.mark.parametrize("backend", ["fused", "block"])
def test_a_per_query_mask_is_split_by_query_rows_too(txt_first, backend):
    # A full (B, 1, S, S) mask differs from query row to query row: text queries must get the text rows
    # and visual queries the visual rows (the other tests' masks are the same for every query).
    q, k, v = _qkv(b=2, h=2, s=30, seed=9)
    n_txt, gamma = 7, 1.3
    g = torch.Generator().manual_seed(10)
    keep = torch.rand(2, 1, 30, 30, generator=g) > 0.4
    keep |= torch.eye(30, dtype=torch.bool)  # every query keeps its own key
    is_txt = text_mask(30, n_txt, txt_first)
    keep[..., is_txt.nonzero()[0, 0]] = True  # and one text key, so every visual query sees some text
    layout = JointLayout(n_txt=n_txt, txt_first=txt_first)
    out, parts = taca_attention(q, k, v, layout, gamma, attn_mask=keep, with_parts=True)
    assert (out.double() - taca_output(q, k, v, n_txt, txt_first, gamma, attn_mask=keep)).abs().max().item() <= 1e-5
    stats = attention_statistics(q, k, layout, gamma, parts, attn_mask=keep, map_tokens=torch.tensor([0, 3]),
                                 backend=backend)
    ref = _reference_masses(q, k, n_txt, txt_first, gamma, attn_mask=keep)
    for name in ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass", "token_mass"):
        assert (stats[name].double() - ref[name]).abs().max().item() <= 1e-5, name
    assert (stats["maps"].double() - ref["maps"][..., [0, 3]]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_token_mass_in_half_precision_survives_widely_spread_lse(dtype):
    # Visual queries whose lse differ by more than ~27 (large logits): weights exp(c - lse) in
    # half precision underflowed, and those queries dropped out of token_mass (off by 8-100 %).
    g = torch.Generator().manual_seed(9)
    q, k, v = ((torch.randn(1, 1, 32 + 160, 32, generator=g) * s).to(dtype) for s in (4, 4, 1))
    layout = JointLayout(32, txt_first=False)
    _, parts = taca_attention(q, k, v, layout, 1.0, with_parts=True)
    assert (parts["lse_vis"].amax(-1) - parts["lse_vis"].amin(-1)).min().item() > 30
    stats = attention_statistics(q, k, layout, 1.0, parts, backend="fused")
    ref = _reference_masses(q, k, 32, False, 1.0)["token_mass"]
    assert (stats["token_mass"].double() - ref).abs().max().item() <= 1e-4 * ref.max().item()


def test_triton_statistics_at_a_head_size_its_kernel_lacks_take_the_fused_path():
    # On CUDA the Triton path is the default; a model whose head size is not a power of two
    # (here 24) stopped the recording with a ValueError from inside the kernel's launcher.
    q, k, v = _qkv(b=1, h=2, s=40, d=24, seed=13)
    layout = JointLayout(8, txt_first=True)
    _, parts = taca_attention(q, k, v, layout, 1.2, with_parts=True)
    stats = attention_statistics(q, k, layout, 1.2, parts, backend="triton")
    ref = _reference_masses(q, k, 8, True, 1.2)
    for name in ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass", "token_mass"):
        assert (stats[name].double() - ref[name]).abs().max().item() <= 1e-5, name
