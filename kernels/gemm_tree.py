"""The segment-tree GEMM (docs/TP.md): the row-parallel linears' K order, the same at every tensor-parallel degree.

y = x @ w.T with K cut into S equal segments, each an fp32 partial (gemm.py's K loop over the segment), added
as a fixed binary tree (kernels/reference.py tree_sum_ref) and rounded once. A rank holding S/tp segments
computes a subtree; the reduction completes the same tree. Prefill runs the tree inside one program per tile;
decode (M <= TREE_SPLIT_M) gives each segment its own program and adds the tree in a second kernel.
"""
import torch
import triton
import triton.language as tl

from .gemm import BLOCK_K, DECODE_M

MAX_SEGMENTS = 32                 # the tree's pending nodes are held in registers: t0..t4 below
TREE = (64, 64, 4, 3)             # BLOCK_M, BLOCK_N, num_warps, num_stages for every M (its price is the GPU issue's)
TREE_SPLIT_M = DECODE_M           # M up to this: each segment its own program (decode), the tree in a second kernel
TREE_SUM_BLOCK = 1024


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


@triton.jit
def _tree_push(node, t0, t1, t2, t3, t4, s: tl.constexpr):
    """Segment s's partial (node) into the tree, walked as a binary counter: s completes the subtrees its
    trailing one bits name (t0 holds a pending single segment, t1 a pair, t2 four, t3 eight, t4 sixteen).
    Every branch is decided at compile time. Returns (node, t0, t1, t2, t3, t4)."""
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
    return node, t0, t1, t2, t3, t4


@triton.jit
def _tree_finish(node, t0, t1, t2, t3, t4, SEGMENTS: tl.constexpr):
    """The whole tree after SEGMENTS pushes: the nodes still pending (the one bits of SEGMENTS) added smallest
    first, which is tree_sum_ref's carried-up order; SEGMENTS = 2^k leaves the whole tree in node."""
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
    return node


@triton.jit(do_not_specialize=["M"])
def _matmul_tree_kernel(X, W, Y, M, N, K_SEG,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                        SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """y = x @ w.T with K in SEGMENTS segments of K_SEG, each an fp32 partial, added as reference.py's
    tree_sum_ref does (neighbours in pairs, an odd last node carried up), rounded once at the store."""
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
        node, t0, t1, t2, t3, t4 = _tree_push(node, t0, t1, t2, t3, t4, s)
    node = _tree_finish(node, t0, t1, t2, t3, t4, SEGMENTS)
    y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptr, node.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# Decode (M <= TREE_SPLIT_M): one program per (tile, segment) writes the segment's fp32 partial, and a second
# kernel adds the partials in the same tree. The partials are _matmul_tree_kernel's nodes (the same
# _segment_dot on the same tile) and the adds are the same fp32 adds in the same order, so a row keeps its bits;
# what changes is the parallelism: SEGMENTS times the programs to stream the weights at M = 1 (wo at TREE's
# tile: 64 programs on a 132-SM card without it).
@triton.jit(do_not_specialize=["M"])
def _tree_partials_kernel(X, W, P, M, N, K_SEG, stride_xm, stride_xk, stride_wn, stride_wk,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """P[s] = segment s's fp32 partial of the tile (P: [SEGMENTS, M, N], contiguous); s = program_id(2)."""
    s = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_base = X + rm[:, None].to(tl.int64) * stride_xm + s * K_SEG * stride_xk
    w_base = W + rn[None, :].to(tl.int64) * stride_wn + s * K_SEG * stride_wk
    part = _segment_dot(x_base, w_base, rm, rn, M, N, K_SEG, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K)
    p_ptr = P + s * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(p_ptr, part, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _tree_sum_kernel(P, Y, MN, N, stride_ym, stride_yn, SEGMENTS: tl.constexpr, BLOCK: tl.constexpr):
    """y = the tree over P's SEGMENTS partials, element by element, rounded once at the store."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    t0 = tl.zeros((BLOCK,), dtype=tl.float32)
    t1, t2, t3, t4 = t0, t0, t0, t0
    node = t0
    for s in tl.static_range(SEGMENTS):
        node = tl.load(P + s * MN + i, mask=ok, other=0.0)
        node, t0, t1, t2, t3, t4 = _tree_push(node, t0, t1, t2, t3, t4, s)
    node = _tree_finish(node, t0, t1, t2, t3, t4, SEGMENTS)
    y_ptr = Y + (i // N).to(tl.int64) * stride_ym + (i % N) * stride_yn
    tl.store(y_ptr, node.to(Y.dtype.element_ty), mask=ok)


def matmul_tree(x, w, segments: int, *, out_dtype=None, split=None, block_m=None, block_n=None, block_k=BLOCK_K):
    """y = x @ w.T (x [M, K], w [N, K]) in the segment tree's order: K in `segments` equal segments, each an
    fp32 partial, added as a fixed binary tree in fp32 and rounded once to out_dtype (default x.dtype;
    float32: the unrounded subtree a tensor-parallel rank sends). The bits of a row do not depend on M.
    split: the segments in programs of their own, then the tree in a second kernel (default: M <= TREE_SPLIT_M,
    decode); the same bits either way, which tests/test_kernels_gemm_tree.py and the GPU tests check."""
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
    if split is None:
        split = M <= TREE_SPLIT_M
    if split:
        parts = torch.empty((segments, M, N), dtype=torch.float32, device=x.device)
        _tree_partials_kernel[(*grid, segments)](x, w, parts, M, N, K // segments,
                                                 x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k,
                                                 num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
        _tree_sum_kernel[(triton.cdiv(M * N, TREE_SUM_BLOCK),)](parts, y, M * N, N, y.stride(0), y.stride(1),
                                                                SEGMENTS=segments, BLOCK=TREE_SUM_BLOCK,
                                                                enable_fp_fusion=False)
        return y
    _matmul_tree_kernel[grid](x, w, y, M, N, K // segments,
                              x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
                              SEGMENTS=segments, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k,
                              num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
    return y
