"""A single-pass Triton kernel for the probe's visual->text sums (optional; CUDA with Triton).

One pass over the visual-query x text-key tiles computes ``p_ij = exp(scale * q_i.k_j - L_i)`` in
fp32 registers and reduces it both ways: row sums stored, column sums added atomically; no logit
block reaches memory. Triton is imported only when asked for; ``TRITON_INTERPRET=1`` runs the
kernel on the CPU (the tests do).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["available", "text_sums", "HEAD_DIMS"]

#: Head dimensions the kernel takes (tl.dot needs a power of two, at least 16).
HEAD_DIMS = (16, 32, 64, 128, 256)


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: Triton installed, and CUDA (or the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _kernel():
    # Built on first use (Triton is optional, and its interpreter mode is read when a kernel is made).
    import triton
    import triton.language as tl

    @triton.jit
    def text_sums_kernel(
        q_ptr, k_ptr, lse_ptr, rows_ptr, cols_ptr,
        n_heads, n_vis, n_txt, scale,
        sq_b, sq_h, sq_n, sq_d,
        sk_b, sk_h, sk_n, sk_d,
        sl_b, sl_h, sl_n,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_COLS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < n_vis
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                    mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + b * sl_b + h * sl_h + offs_m * sl_n, mask=row_ok, other=float("inf"))
        rows = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_txt, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < n_txt
            k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                        mask=col_ok[:, None], other=0.0)
            # ieee: fp32 inputs would otherwise go through TF32 (10-bit mantissa; masses off by ~1e-4,
            # measured on an H200); bf16/fp16 inputs ignore it.
            s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32) * scale
            p = tl.exp(s - lse[:, None])
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
            rows += tl.sum(p, axis=1)
            if WITH_COLS:
                tl.atomic_add(cols_ptr + b * n_txt + offs_n, tl.sum(p, axis=0), mask=col_ok)
        tl.store(rows_ptr + bh * n_vis + offs_m, rows, mask=row_ok)

    return text_sums_kernel


def text_sums(q_v: torch.Tensor, k_t: torch.Tensor, lse: torch.Tensor, scale: float, *,
              columns: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row and column sums of ``exp(scale * q_v k_t^T - lse)``, without forming it.

    Parameters
    ----------
    q_v, k_t : (B, H, N_vis, D) and (B, H, N_txt, D), one dtype
    lse : (B, H, N_vis), each query's log-sum-exp to subtract
    scale : the logits' scale (gamma included)

    Returns
    -------
    rows : (B, H, N_vis) fp32, ``sum_j exp(...)``
    cols : (B, N_txt) fp32, ``sum_{h, i} exp(...)`` (None without ``columns``)
    """
    B, H, n_vis, d = q_v.shape
    n_txt = k_t.shape[2]
    if d not in HEAD_DIMS:
        raise ValueError(f"head dimension {d} is not supported by the Triton kernel")
    lse = lse.float()
    rows = torch.empty((B, H, n_vis), dtype=torch.float32, device=q_v.device)
    cols = torch.zeros((B, n_txt), dtype=torch.float32, device=q_v.device) if columns else rows
    block_m, block_n = (64, 64) if d <= 64 else (64, 32)
    grid = (-(-n_vis // block_m), B * H)  # ceil(n_vis / block_m) query tiles per (batch, head)
    _kernel()[grid](
        q_v, k_t, lse, rows, cols, H, n_vis, n_txt, float(scale),
        *q_v.stride(), *k_t.stride(), *lse.stride(),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, WITH_COLS=columns,
    )
    return rows, (cols if columns else None)
