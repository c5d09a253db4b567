"""Rotary embedding, HF rotate_half style (pairs d and d + D/2), fp32 math.

out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin, cast back to x.dtype.
Positions are read from a device tensor (no host sync). One program per row.
"""
import torch
import triton
import triton.language as tl

NUM_WARPS = 4


@triton.jit
def _rope_kernel(X, COS, SIN, POS, Y, n_heads, half,
                 stride_xm, stride_xh, stride_ym, stride_yh, stride_c, stride_s,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + row).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < half
    ok = (h[:, None] < n_heads) & d_ok[None, :]
    c = tl.load(COS + pos * stride_c + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + pos * stride_s + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    x_ptr = X + row * stride_xm + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x_ptr, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=ok, other=0.0).to(tl.float32)
    y_ptr = Y + row * stride_ym + h[:, None] * stride_yh + d[None, :]
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=ok)
    tl.store(y_ptr + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=ok)


def rope(x, cos, sin, positions):
    """x [M, n_heads, D], cos/sin [S, D//2], positions [M] int -> [M, n_heads, D] in x.dtype."""
    M, n_heads, D = x.shape
    half = D // 2
    assert D % 2 == 0 and x.stride(2) == 1, (x.shape, x.stride())
    assert cos.shape[1] == half and sin.shape[1] == half and cos.stride(1) == 1 and sin.stride(1) == 1
    assert positions.shape == (M,), positions.shape
    y = torch.empty((M, n_heads, D), dtype=x.dtype, device=x.device)
    _rope_kernel[(M,)](x, cos, sin, positions, y, n_heads, half,
                       x.stride(0), x.stride(1), y.stride(0), y.stride(1), cos.stride(0), sin.stride(0),
                       BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(half),
                       num_warps=NUM_WARPS, enable_fp_fusion=False)
    return y
