"""CUDA checks of the TACA path and the probe (skipped without CUDA; run by analysis/gpu_check.sh).

Tolerances, and why:
- fp32: the fused kernels accumulate in fp32 like the reference's float64 up to rounding, so the
  same 1e-5 as on the CPU for outputs of O(1) inputs would be too tight only through TF32, which
  SDPA does not use; we allow 5e-5 for outputs and 1e-5 for masses.
- bf16: inputs are rounded to bf16 before any kernel, and the reference sees the same rounded
  values; outputs are rounded once to bf16 (relative 2^-8), so we allow the stock kernel's own
  error against the same reference, times 2, plus one bf16 ulp of the output scale. Masses are
  computed in fp32 from the bf16 logits: 2e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taca_probe.attention import JointLayout, attention_statistics, taca_attention
from taca_probe.intervention import taca
from taca_probe.models import load_pipeline
from tests.reference import ExplicitTacaSDPA, taca_output, taca_probabilities, text_mask

pytestmark = pytest.mark.gpu

SHAPES = {  # (B, H, n_txt, n_vis, D, txt_first): FLUX-like and SD3-like at reduced size
    "flux": (1, 4, 512, 1024, 128, True),
    "sd3": (2, 4, 333, 1024, 64, False),
}


def _qkv(shape, dtype, seed=0):
    b, h, nt, nv, d, _ = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, nt + nv, d, generator=g).to("cuda", dtype) for _ in range(3)]


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gamma", [1.0, 1.2, 2.0])
def test_taca_attention_cuda_matches_reference(name, dtype, gamma):
    shape = SHAPES[name]
    q, k, v = _qkv(shape, dtype)
    layout = JointLayout(shape[2], shape[5])
    out = taca_attention(q, k, v, layout, gamma)
    ref = taca_output(q.cpu(), k.cpu(), v.cpu(), shape[2], shape[5], gamma)
    err = (out.double().cpu() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 5e-5
    else:
        stock_err = (F.scaled_dot_product_attention(q, k, v).double().cpu()
                     - taca_output(q.cpu(), k.cpu(), v.cpu(), shape[2], shape[5], 1.0)).abs().max().item()
        assert err <= 2 * stock_err + 2 ** -8 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gamma_one_cuda_is_stock_also_when_measuring(dtype):
    q, k, v = _qkv(SHAPES["flux"], dtype)
    stock = F.scaled_dot_product_attention(q, k, v)
    layout = JointLayout(512, True)
    assert torch.equal(taca_attention(q, k, v, layout, 1.0), stock)
    out, _ = taca_attention(q, k, v, layout, 1.0, with_parts=True)
    assert torch.equal(out, stock)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gamma", [1.0, 1.3])
def test_statistics_cuda_match_reference(name, dtype, gamma):
    b, h, nt, nv, d, txt_first = SHAPES[name]
    q, k, v = _qkv(SHAPES[name], dtype, seed=1)
    layout = JointLayout(nt, txt_first)
    _, parts = taca_attention(q, k, v, layout, gamma, with_parts=True)
    tokens = torch.arange(0, nt, 7, device="cuda")
    stats = attention_statistics(q, k, layout, gamma, parts, map_tokens=tokens)
    p = taca_probabilities(q.cpu(), k.cpu(), nt, txt_first, gamma)
    p1 = taca_probabilities(q.cpu(), k.cpu(), nt, txt_first, 1.0)
    is_txt = text_mask(nt + nv, nt, txt_first)
    p_vt = p[:, :, ~is_txt][..., is_txt]
    tol = 1e-5 if dtype == torch.float32 else 2e-4
    checks = {
        "vis_txt_mass": p_vt.sum(-1).mean(-1),
        "vis_txt_mass_ref": p1[:, :, ~is_txt][..., is_txt].sum(-1).mean(-1),
        "txt_vis_mass": p[:, :, is_txt][..., ~is_txt].sum(-1).mean(-1),
        "token_mass": p_vt.mean(dim=(1, 2)),
    }
    for key, ref in checks.items():
        assert (stats[key].double().cpu() - ref).abs().max().item() <= tol, key
    assert (stats["maps"].double().cpu() - p_vt.mean(1)[..., tokens.cpu()]).abs().max().item() <= tol


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd35", "tiny-flux"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pipelines_on_cuda(model, dtype):
    pipe = load_pipeline(model, device="cuda", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 3, "height": 64, "width": 96, "output_type": "np"}
    stock = pipe("a red cube", generator=torch.Generator().manual_seed(0), **kw).images
    with taca(pipe, "none"):
        same = pipe("a red cube", generator=torch.Generator().manual_seed(0), **kw).images
    assert (same == stock).all()  # gamma = 1: stock output, bit for bit
    # one site against the explicit reference on the same activations, through diffusers' processor
    transformer = pipe.transformer
    name = "transformer_blocks.0.attn"
    module = transformer.get_submodule(name)
    stock_proc = module.processor
    seen = {}

    def keep_first(mod, args, kwargs, out):
        seen.setdefault("x", (args, dict(kwargs), out))  # returns None: the output is untouched

    h = module.register_forward_hook(keep_first, with_kwargs=True)
    try:
        with taca(pipe, "const:1.3"):
            pipe("a red cube", generator=torch.Generator().manual_seed(0), **kw)
    finally:
        h.remove()
    args, kwargs, out = seen["x"]
    n_txt = kwargs["encoder_hidden_states"].shape[1]
    with torch.no_grad(), ExplicitTacaSDPA(n_txt, model == "tiny-flux", 1.3):
        ref = stock_proc(module, *args, **kwargs)
    tol = 5e-5 if dtype == "fp32" else 3e-2
    for r, o in zip(ref, out):
        assert (r.double() - o.double()).abs().max().item() <= tol
