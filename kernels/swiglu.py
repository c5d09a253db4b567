"""SwiGLU: silu(gate) * up in fp32, cast to gate.dtype. Elementwise."""
import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_kernel(G, U, Y, n_cols, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)


def swiglu(gate, up, *, block=BLOCK):
    """gate, up [M, I] -> silu(gate) * up, [M, I] in gate.dtype."""
    assert gate.shape == up.shape and gate.dim() == 2, (gate.shape, up.shape)
    assert gate.stride(1) == 1 and up.stride(1) == 1
    M, n = gate.shape
    y = torch.empty((M, n), dtype=gate.dtype, device=gate.device)
    _swiglu_kernel[(M, triton.cdiv(n, block))](gate, up, y, n, gate.stride(0), up.stride(0), y.stride(0),
                                                BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return y
