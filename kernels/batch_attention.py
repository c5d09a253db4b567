"""Decode attention of several sequences in one launch, each row over its own sequence's KV slab.

q [n, n_heads, D]: row i is one query of sequence seq[i] at position pos[i]; the caches are the batch's
slabs k, v [n_seqs, n_kv, S_max, D] (contiguous). Per row this is attention.decode_attention exactly: one
program per (row, kv head, split) runs the same _split_partial over the same BLOCK_KV blocks and split
bounds with the same launch (BLOCK_M, num_warps, num_stages, pointer loads), and one merge program per
(row, head) merges the splits in order with the same _merge. Only the program grid gains the row axis, and
the row's slab and position are read from device tensors (so the step can be captured in a CUDA graph). So a
row's bits are those of the single-sequence decode: batch-invariant by construction, and tested against it
(tests/test_kernels_batch_attention.py under the interpreter, tests/test_kernels_gpu.py style on the GPU).
"""
import math

import torch
import triton
import triton.language as tl

from .attention import BLOCK_KV, BLOCK_M, LOG2E, NUM_STAGES, NUM_WARPS, SPLIT_KV, _merge, _split_partial


@triton.jit
def _batch_decode_kernel(Q, K, V, PM, PL, PACC, POS, SEQ, group, n_kv, n_heads, n_splits, qk_scale,
                         stride_qt, stride_qh, s_max,
                         BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, SPLIT_KV: tl.constexpr,
                         HEAD_D: tl.constexpr):
    # program (row, kv head, split): attention.py's decode program for sequence SEQ[row] at POS[row]
    i = tl.program_id(0)
    hp = tl.program_id(1)
    pid_s = tl.program_id(2)
    start = tl.load(POS + i)
    b = tl.load(SEQ + i)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_D)
    p = start + r * 0
    hrow = hp * group + r
    row_ok = r < group
    kv_row = (b * n_kv + hp).to(tl.int64) * s_max
    q = tl.load(Q + i.to(tl.int64) * stride_qt + hrow[:, None] * stride_qh + d[None, :], mask=row_ok[:, None],
                other=0.0)
    s_lo = pid_s * SPLIT_KV
    if s_lo <= start:
        m_s, l_s, acc_s = _split_partial(q, K, V, kv_row, p, start, s_lo, tl.minimum(s_lo + SPLIT_KV, start + 1),
                                         qk_scale, BLOCK_M, BLOCK_KV, HEAD_D, False)
        w = (i * n_heads + hrow) * n_splits + pid_s
        tl.store(PM + w, m_s, mask=row_ok)
        tl.store(PL + w, l_s, mask=row_ok)
        tl.store(PACC + w[:, None] * HEAD_D + d[None, :], acc_s, mask=row_ok[:, None])


@triton.jit
def _batch_merge_kernel(PM, PL, PACC, O, POS, n_heads, n_splits, stride_ot, stride_oh,
                        SPLIT_KV: tl.constexpr, HEAD_D: tl.constexpr):
    """Per (row, head): merge the partials of splits 0..pos // SPLIT_KV in order (attention._merge_kernel)."""
    g = tl.program_id(0)
    i = g // n_heads
    h = g % n_heads
    pos = tl.load(POS + i)
    r = tl.arange(0, 1)
    d = tl.arange(0, HEAD_D)
    m = tl.full((1,), float("-inf"), tl.float32)
    l = tl.zeros((1,), tl.float32)
    acc = tl.zeros((1, HEAD_D), tl.float32)
    for s in range(0, pos // SPLIT_KV + 1):
        w = (i * n_heads + h) * n_splits + s + r
        m_s = tl.load(PM + w)
        l_s = tl.load(PL + w)
        acc_s = tl.load(PACC + w[:, None] * HEAD_D + d[None, :])
        m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s, r >= 0)
    o = acc / l[:, None]
    tl.store(O + i.to(tl.int64) * stride_ot + h * stride_oh + r[:, None] * 0 + d[None, :], o.to(O.dtype.element_ty))


def batch_decode_attention(q, k_slabs, v_slabs, seq, pos, *, block_m=None, block_kv=None, split_kv=None):
    """q [n, n_heads, D]; k_slabs, v_slabs [n_seqs, n_kv, S_max, D]; seq, pos [n] int64 device tensors ->
    o [n, n_heads, D], row i = decode_attention(q[i:i+1], k_slabs[seq[i]], v_slabs[seq[i]], pos[i])."""
    block_m, block_kv, split_kv = block_m or BLOCK_M, block_kv or BLOCK_KV, split_kv or SPLIT_KV
    n, n_heads, D = q.shape
    _, n_kv, s_max, Dk = k_slabs.shape
    assert Dk == D and v_slabs.shape == k_slabs.shape and D == triton.next_power_of_2(D), (q.shape, k_slabs.shape)
    assert k_slabs.is_contiguous() and v_slabs.is_contiguous() and q.stride(2) == 1 and q.dtype == k_slabs.dtype
    assert s_max % block_kv == 0 and split_kv % block_kv == 0 and n_heads % n_kv == 0
    group = n_heads // n_kv
    assert group <= block_m, "a GQA group must fit in one query tile"
    assert seq.shape == (n,) and pos.shape == (n,), (seq.shape, pos.shape)
    n_splits = triton.cdiv(s_max, split_kv)
    o = torch.empty((n, n_heads, D), dtype=q.dtype, device=q.device)
    pm = torch.empty((n, n_heads, n_splits), dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    pacc = torch.empty((n, n_heads, n_splits, D), dtype=torch.float32, device=q.device)
    _batch_decode_kernel[(n, n_kv, n_splits)](
        q, k_slabs, v_slabs, pm, pl, pacc, pos, seq, group, n_kv, n_heads, n_splits, LOG2E / math.sqrt(D),
        q.stride(0), q.stride(1), s_max, BLOCK_M=block_m, BLOCK_KV=block_kv, SPLIT_KV=split_kv, HEAD_D=D,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=False)
    _batch_merge_kernel[(n * n_heads,)](pm, pl, pacc, o, pos, n_heads, n_splits, o.stride(0), o.stride(1),
                                        SPLIT_KV=split_kv, HEAD_D=D, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return o
