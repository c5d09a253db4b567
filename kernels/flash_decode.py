"""Flash-decoding: one query position's GQA attention over a KV cache, split over the keys, for the
kv_aligned=0 fast path (greta/engine/ops/cuda_fast.py), for one sequence (`flash_decode`) or for a batch
decode step whose rows each read their own sequence's slab (`flash_decode_batch`, ops/batch.py
FastBatchOps). Not batch-invariant and not meant to be: the split depends on the cache capacity and, in a
batch, on the row count. Reference: reference.attention_ref(q, k_cache, v_cache, pos) (keys 0..pos), per row
reference.batch_decode_ref.

One pair of kernels serves both: a row axis in the grid, the single-sequence call being a batch of one row
on one slab (BY_SEQ=False: no sequence ids to read, the slab is the cache itself).
Stage 1, one program per (row, kv head, split of SPLIT keys): the GQA group's query heads (rows of the MMA,
padded to 16) against the split's keys <= pos[row] of slab seq[row], an online softmax over BLOCK_N-key
blocks, written as a partial (row max m, row sum l, unnormalised acc) in fp32. Programs whose split starts
past the row's position do nothing.
Stage 2, one program per (row, query head): merges the partials of splits 0..pos[row] // SPLIT, BLOCK_S of
them at a time (vectorised, not one split per loop trip), and writes o = acc / l.

Positions (and sequence ids) are read from device tensors and the grid covers the whole cache capacity, so
the launch does not depend on them: no host sync, and the step can be captured in a CUDA graph and replayed
at any positions.
"""
import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64    # keys per online-softmax step
BLOCK_S = 64    # partials merged per step of stage 2
TARGET_PROGRAMS = 1024  # stage-1 programs over the full capacity: several waves on 132 SMs
MIN_SPLIT, MAX_SPLIT = 128, 2048
NUM_WARPS = 4
LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(Q, K, V, PM, PL, PACC, POS, SEQ, group, n_kv, n_heads, n_splits, qk_scale, stride_qt,
                  stride_qh, s_max, BY_SEQ: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLIT: tl.constexpr, HEAD_D: tl.constexpr):
    i = tl.program_id(0)  # the row (one query position of one sequence)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    pos = tl.load(POS + i).to(tl.int32)  # positions < 2**31; the loop bounds stay int32
    lo = s * SPLIT
    if lo <= pos:
        if BY_SEQ:
            slab = tl.load(SEQ + i).to(tl.int64)
        else:
            slab = 0
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_D)
        row_ok = g < group
        heads = hk * group + g
        q = tl.load(Q + i.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_ok[:, None],
                    other=0.0)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, HEAD_D), tl.float32)
        base = (slab * n_kv + hk).to(tl.int64) * s_max * HEAD_D  # slabs past 2**31 elements
        hi = tl.minimum(lo + SPLIT, pos + 1)
        for n0 in range(lo, hi, BLOCK_N):  # the first block holds key lo <= pos, so m is finite after it
            j = n0 + tl.arange(0, BLOCK_N)
            ok = j < hi
            offs = base + j[:, None].to(tl.int64) * HEAD_D + d[None, :]
            k = tl.load(K + offs, mask=ok[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k)) * qk_scale
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(V + offs, mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        w = (i * n_heads + heads) * n_splits + s
        tl.store(PM + w, m, mask=row_ok)
        tl.store(PL + w, l, mask=row_ok)
        tl.store(PACC + w[:, None] * HEAD_D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(PM, PL, PACC, O, POS, n_heads, n_splits, stride_ot, stride_oh,
                  SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_D: tl.constexpr):
    i = tl.program_id(0)  # the row
    h = tl.program_id(1)
    n_used = tl.load(POS + i).to(tl.int32) // SPLIT + 1
    d = tl.arange(0, HEAD_D)
    si = tl.arange(0, BLOCK_S)
    m = tl.full((1,), float("-inf"), tl.float32)
    l = tl.zeros((1,), tl.float32)
    acc = tl.zeros((HEAD_D,), tl.float32)
    for s0 in range(0, n_used, BLOCK_S):
        s = s0 + si
        ok = s < n_used
        w = (i * n_heads + h) * n_splits + s
        m_s = tl.load(PM + w, mask=ok, other=float("-inf"))
        l_s = tl.load(PL + w, mask=ok, other=0.0)
        a_s = tl.load(PACC + w[:, None] * HEAD_D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, 0))  # finite: split 0 is in the first step
        keep = tl.exp2(m - m_new)
        ws = tl.where(ok, tl.exp2(m_s - m_new), 0.0)
        l = l * keep + tl.sum(l_s * ws, 0)
        acc = acc * keep + tl.sum(a_s * ws[:, None], 0)
        m = m_new
    tl.store(O + i.to(tl.int64) * stride_ot + h * stride_oh + d, (acc / l).to(O.dtype.element_ty))


def split_size(s_max: int, n_kv: int, rows: int = 1) -> int:
    """Keys per split for `rows` query rows over caches of s_max positions: at least TARGET_PROGRAMS stage-1
    programs over the whole capacity (the largest power of two that gives them), within [MIN_SPLIT, MAX_SPLIT]
    (a multiple of BLOCK_N). A batch's rows bring their own programs, so its splits are longer: fewer
    partials to merge, the same parallelism."""
    want = max(1, rows * s_max * n_kv // TARGET_PROGRAMS)
    return min(MAX_SPLIT, max(MIN_SPLIT, 1 << (want.bit_length() - 1)))


def flash_decode(q, k_cache, v_cache, pos, *, split=None):
    """q [1, n_heads, D] at position pos (a 1-element int tensor on q's device, or an int) over
    k_cache, v_cache [n_kv, s_max, D] (keys 0..pos) -> o [1, n_heads, D] in q's dtype."""
    assert q.shape[0] == 1, q.shape
    if isinstance(pos, torch.Tensor):
        pos_t = pos.reshape(1).to(device=q.device, dtype=torch.int64)
    else:
        pos_t = torch.tensor([pos], dtype=torch.int64, device=q.device)
    return _launch(q, k_cache[None], v_cache[None], pos_t, None, split)


def flash_decode_batch(q, k_slabs, v_slabs, seq, pos, *, split=None):
    """q [n, n_heads, D]: row i is one query of sequence seq[i] at position pos[i]; k_slabs, v_slabs
    [n_seqs, n_kv, s_max, D] (contiguous); seq, pos [n] integer tensors on q's device -> o [n, n_heads, D]
    in q's dtype, row i = flash_decode(q[i:i+1], k_slabs[seq[i]], v_slabs[seq[i]], pos[i]) (the same
    program, but the split is chosen for n rows: split_size(s_max, n_kv, n))."""
    n = q.shape[0]
    assert seq.shape == (n,) and pos.shape == (n,), (q.shape, seq.shape, pos.shape)
    assert seq.device == q.device and pos.device == q.device, "sequence ids and positions stay on the device"
    assert not seq.is_floating_point() and not pos.is_floating_point(), (seq.dtype, pos.dtype)
    return _launch(q, k_slabs, v_slabs, pos, seq, split)


def _launch(q, k_slabs, v_slabs, pos, seq, split):
    """Both stages over slabs [n_seqs, n_kv, s_max, D]; seq None: every row reads slab 0."""
    n, n_heads, D = q.shape
    _, n_kv, s_max, Dk = k_slabs.shape
    assert Dk == D and v_slabs.shape == k_slabs.shape and D == triton.next_power_of_2(D), (q.shape, k_slabs.shape)
    assert n_heads % n_kv == 0 and q.stride(2) == 1 and k_slabs.is_contiguous() and v_slabs.is_contiguous()
    group = n_heads // n_kv
    split = split or split_size(s_max, n_kv, n)
    assert split % BLOCK_N == 0, split
    n_splits = triton.cdiv(s_max, split)
    pm = torch.empty((n, n_heads, n_splits), dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    pacc = torch.empty((n, n_heads, n_splits, D), dtype=torch.float32, device=q.device)
    o = torch.empty((n, n_heads, D), dtype=q.dtype, device=q.device)
    _split_kernel[(n, n_kv, n_splits)](q, k_slabs, v_slabs, pm, pl, pacc, pos, pos if seq is None else seq, group,
                                       n_kv, n_heads, n_splits, LOG2E / math.sqrt(D), q.stride(0), q.stride(1), s_max,
                                       BY_SEQ=seq is not None, BLOCK_G=max(16, triton.next_power_of_2(group)),
                                       BLOCK_N=BLOCK_N, SPLIT=split, HEAD_D=D, num_warps=NUM_WARPS)
    _merge_kernel[(n, n_heads)](pm, pl, pacc, o, pos, n_heads, n_splits, o.stride(0), o.stride(1),
                                SPLIT=split, BLOCK_S=BLOCK_S, HEAD_D=D, num_warps=NUM_WARPS)
    return o
