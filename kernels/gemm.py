"""Batch-invariant GEMM: y = x @ w.T with one fixed tile config for every M.

Row i of y is computed by the program of M-tile i // BLOCK_M, at the same row
of that tile, with the same K loop in the same order, whatever M is: so a
decode step (M=1) gets the same bits as the same row inside a prefill.
No split-K (it would change the reduction order).
"""
import torch
import triton
import triton.language as tl

# One config for every M. Untuned: a reasonable H100 prefill tile, not measured.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 3


# M is not specialised, so M=1 (decode) and M>1 (prefill) run the same binary.
@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(X, W, Y, M, N, K,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    w_ptr = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk + k0 < K
        x = tl.load(x_ptr, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptr += BLOCK_K * stride_xk
        w_ptr += BLOCK_K * stride_wk
    y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(x, w, *, block_m=BLOCK_M, block_n=BLOCK_N, block_k=BLOCK_K):
    """y = x @ w.T. x [M, K], w [N, K] (nn.Linear layout); y [M, N] in x.dtype.

    The block_* overrides exist for tests only; real callers use the defaults.
    """
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.dtype == w.dtype, (x.dtype, w.dtype)
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _matmul_kernel[grid](x, w, y, M, N, K,
                         x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=False)
    return y


def matmul_ref(x, w):
    return (x.float() @ w.float().T).to(x.dtype)
