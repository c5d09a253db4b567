"""Batch-invariant GEMM: y = x @ w.T, a row's bits independent of M.

A row's result is its K loop: acc = 0; for each BLOCK_K block in order, acc = dot(x_blk, w_blk, acc), in
fp32, on the same MMA instruction (Hopper: wgmma m64nNk16, so BLOCK_M >= 64 and 4 warps per warpgroup).
That loop is fixed for every M: one BLOCK_K, one order, no split-K. The M and N tile sizes only decide
which rows and columns share a program, not how an element is summed. So decode (M <= 64) uses a narrow
tile that launches many programs (weights stream faster at M=1), and prefill a wide one walked by one
persistent program per SM with TMA loads; both share BLOCK_K and the MMA. That the two give the same bits is
not assumed: tests/test_kernels_gpu.py::test_matmul and bench/try_gemm_persistent.py compare them row by row
on the GPU (bit-identical on H100, 2026-11-26).
"""
import functools

import torch
import triton
import triton.language as tl

BLOCK_K = 64                      # the one reduction step; shared by both tiles
PREFILL = (128, 256, 8, 3)        # BLOCK_M, BLOCK_N, num_warps, num_stages for M > DECODE_M
GROUP_M = 8                       # prefill: row tiles walked together, so their W tiles are reused from L2
DECODE = (64, 32, 4, 8)           # for M <= DECODE_M
DECODE_M = 64
# H100, 2026-11-26, M=2048 on the Llama-3-8B layer shapes (bench/try_gemm_persistent.py): persistent TMA
# prefill 710 TFLOP/s (v0.6's (128, 128) tile, BLOCK_K 128: 611; cuBLAS 714 in the same run); decode tile
# 0.213 ms per layer at M=1 (v0.6: 0.216).


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


@triton.jit
def _matmul_persistent_kernel(x_desc, w_desc, y_desc, M, N, K, NUM_SMS: tl.constexpr, GROUP_M: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same K loop as _matmul_kernel per output tile, tiles brought in by the TMA engine (out of bounds
    reads 0); one program per SM walks the tiles, GROUP_M row tiles at a time."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    for tile in tl.range(tl.program_id(0), n_m * n_n, NUM_SMS, flatten=True):
        first_m = tile // per_group * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = (tile % per_group) // size_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(x, w.T, acc)
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y_desc.dtype))


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_ok(*ts) -> bool:
    """TMA needs a GPU, row-major rows and 16-byte aligned bases and row strides."""
    return all(t.is_cuda and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in ts)


def matmul(x, w, *, block_m=None, block_n=None, block_k=BLOCK_K):
    """y = x @ w.T. x [M, K], w [N, K] (nn.Linear layout); y [M, N] in x.dtype.

    The block_* overrides exist for tests only; real callers use the defaults.
    """
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.dtype == w.dtype, (x.dtype, w.dtype)
    M, K = x.shape
    N = w.shape[0]
    bm, bn, num_warps, num_stages = DECODE if M <= DECODE_M else PREFILL
    bm, bn = block_m or bm, block_n or bn
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    if M > DECODE_M and block_m is None and _tma_ok(x, w, y):
        from triton.tools.tensor_descriptor import TensorDescriptor as TD

        sms = _sm_count(x.device)
        _matmul_persistent_kernel[(min(sms, grid[0] * grid[1]),)](
            TD.from_tensor(x, [bm, block_k]), TD.from_tensor(w, [bn, block_k]), TD.from_tensor(y, [bm, bn]),
            M, N, K, NUM_SMS=sms, GROUP_M=GROUP_M, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
        return y
    _matmul_kernel[grid](x, w, y, M, N, K,
                         x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k,
                         num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
    return y
