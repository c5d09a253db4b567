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


# --- the segment tree (docs/TP.md): the row-parallel linears' K order, the same at every tensor-parallel degree
MAX_SEGMENTS = 32                 # the tree's pending nodes are held in registers: t0..t4 below
TREE = (64, 64, 4, 3)             # BLOCK_M, BLOCK_N, num_warps, num_stages for every M (its price is the GPU issue's)


@triton.jit
def _segment_dot(x_ptr, w_ptr, rm, rn, M, N, K_SEG, stride_xk, stride_wk,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One segment's partial: its K_SEG columns in BLOCK_K steps, in fp32 (_matmul_kernel's loop)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_SEG, BLOCK_K):
        k_ok = rk + k0 < K_SEG
        x = tl.load(x_ptr + (rk + k0)[None, :] * stride_xk, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (rk + k0)[:, None] * stride_wk, mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit(do_not_specialize=["M"])
def _matmul_tree_kernel(X, W, Y, M, N, K_SEG,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                        SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """y = x @ w.T with K in SEGMENTS segments of K_SEG, each an fp32 partial, added as reference.py's
    tree_sum_ref does (neighbours in pairs, an odd last node carried up), rounded once at the store. The
    tree is walked as a binary counter: segment s completes the subtrees its trailing one bits name (t0 holds
    a pending single segment, t1 a pair, t2 four, t3 eight, t4 sixteen); the nodes still pending at the end are added
    smallest first, which is the carried-up order. Every branch is decided at compile time (s, SEGMENTS)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_base = X + rm[:, None].to(tl.int64) * stride_xm
    w_base = W + rn[None, :].to(tl.int64) * stride_wn
    t0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t1, t2, t3, t4 = t0, t0, t0, t0
    node = t0
    for s in tl.static_range(SEGMENTS):
        node = _segment_dot(x_base + s * K_SEG * stride_xk, w_base + s * K_SEG * stride_wk, rm, rn, M, N, K_SEG,
                            stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K)
        if s % 2 == 0:
            t0 = node
        else:
            node = t0 + node
            if s // 2 % 2 == 0:
                t1 = node
            else:
                node = t1 + node
                if s // 4 % 2 == 0:
                    t2 = node
                else:
                    node = t2 + node
                    if s // 8 % 2 == 0:
                        t3 = node
                    else:
                        node = t3 + node
                        if s // 16 % 2 == 0:
                            t4 = node
                        else:
                            node = t4 + node
    # pending nodes (the one bits of SEGMENTS), smallest first; SEGMENTS = 2^k leaves the whole tree in node
    if SEGMENTS % 2 == 1:
        node = t0
    if SEGMENTS // 2 % 2 == 1:
        if SEGMENTS % 2 == 0:
            node = t1
        else:
            node = t1 + node
    if SEGMENTS // 4 % 2 == 1:
        if SEGMENTS % 4 == 0:
            node = t2
        else:
            node = t2 + node
    if SEGMENTS // 8 % 2 == 1:
        if SEGMENTS % 8 == 0:
            node = t3
        else:
            node = t3 + node
    if SEGMENTS // 16 % 2 == 1:
        if SEGMENTS % 16 == 0:
            node = t4
        else:
            node = t4 + node
    y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptr, node.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul_tree(x, w, segments: int, *, out_dtype=None, block_m=None, block_n=None, block_k=BLOCK_K):
    """y = x @ w.T (x [M, K], w [N, K]) in the segment tree's order: K in `segments` equal segments, each an
    fp32 partial, added as a fixed binary tree in fp32 and rounded once to out_dtype (default x.dtype;
    float32: the unrounded subtree a tensor-parallel rank sends). The bits of a row do not depend on M."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.dtype == w.dtype, (x.dtype, w.dtype)
    M, K = x.shape
    N = w.shape[0]
    if not 1 <= segments <= MAX_SEGMENTS or K % segments:
        raise ValueError(f"matmul_tree: K={K} must split into segments={segments} equal parts (1..{MAX_SEGMENTS})")
    bm, bn, num_warps, num_stages = TREE
    bm, bn = block_m or bm, block_n or bn
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _matmul_tree_kernel[grid](x, w, y, M, N, K // segments,
                              x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
                              SEGMENTS=segments, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k,
                              num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
    return y
