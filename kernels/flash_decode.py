"""Flash-decoding: one query position's GQA attention over a KV cache, split over the keys, for the
kv_aligned=0 fast path (greta/engine/ops/cuda_fast.py). Not batch-invariant and not meant to be: the split
depends on the cache capacity. Reference: reference.attention_ref(q, k_cache, v_cache, pos) (keys 0..pos).

Stage 1, one program per (kv head, split of SPLIT keys): the GQA group's query heads (rows, padded to 16
for the MMA) against the split's keys <= pos, an online softmax over BLOCK_N-key blocks, written as a
partial (row max m, row sum l, unnormalised acc) in fp32. Programs whose split starts past pos do nothing.
Stage 2, one program per query head: merges the partials of splits 0..pos // SPLIT, BLOCK_S of them at a
time (vectorised, not one split per loop trip), and writes o = acc / l.

pos is read from a device tensor and the grid covers the whole cache capacity, so the launch does not
depend on pos: no host sync, and the step can be captured in a CUDA graph and replayed at any position.
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
def _split_kernel(Q, K, V, PM, PL, PACC, POS, group, n_splits, qk_scale, stride_qh, s_max,
                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HEAD_D: tl.constexpr):
    hk = tl.program_id(0)
    s = tl.program_id(1)
    pos = tl.load(POS).to(tl.int32)  # positions < 2**31; the loop bounds stay int32
    lo = s * SPLIT
    if lo <= pos:
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_D)
        row_ok = g < group
        heads = hk * group + g
        q = tl.load(Q + heads[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, HEAD_D), tl.float32)
        base = hk.to(tl.int64) * s_max * HEAD_D
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
        w = heads * n_splits + s
        tl.store(PM + w, m, mask=row_ok)
        tl.store(PL + w, l, mask=row_ok)
        tl.store(PACC + w[:, None] * HEAD_D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(PM, PL, PACC, O, POS, n_splits, stride_oh,
                  SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_D: tl.constexpr):
    h = tl.program_id(0)
    n_used = tl.load(POS).to(tl.int32) // SPLIT + 1
    d = tl.arange(0, HEAD_D)
    si = tl.arange(0, BLOCK_S)
    m = tl.full((1,), float("-inf"), tl.float32)
    l = tl.zeros((1,), tl.float32)
    acc = tl.zeros((HEAD_D,), tl.float32)
    for s0 in range(0, n_used, BLOCK_S):
        s = s0 + si
        ok = s < n_used
        w = h * n_splits + s
        m_s = tl.load(PM + w, mask=ok, other=float("-inf"))
        l_s = tl.load(PL + w, mask=ok, other=0.0)
        a_s = tl.load(PACC + w[:, None] * HEAD_D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, 0))  # finite: split 0 is in the first step
        keep = tl.exp2(m - m_new)
        ws = tl.where(ok, tl.exp2(m_s - m_new), 0.0)
        l = l * keep + tl.sum(l_s * ws, 0)
        acc = acc * keep + tl.sum(a_s * ws[:, None], 0)
        m = m_new
    tl.store(O + h * stride_oh + d, (acc / l).to(O.dtype.element_ty))


def split_size(s_max: int, n_kv: int) -> int:
    """Keys per split for a cache of s_max positions: at least TARGET_PROGRAMS stage-1 programs over the whole
    capacity (the largest power of two that gives them), within [MIN_SPLIT, MAX_SPLIT] (a multiple of BLOCK_N)."""
    want = max(1, s_max * n_kv // TARGET_PROGRAMS)
    return min(MAX_SPLIT, max(MIN_SPLIT, 1 << (want.bit_length() - 1)))


def flash_decode(q, k_cache, v_cache, pos, *, split=None):
    """q [1, n_heads, D] at position pos (a 1-element int tensor on q's device, or an int) over
    k_cache, v_cache [n_kv, s_max, D] (keys 0..pos) -> o [1, n_heads, D] in q's dtype."""
    _, n_heads, D = q.shape
    n_kv, s_max, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and D == triton.next_power_of_2(D), (q.shape, k_cache.shape)
    assert n_heads % n_kv == 0 and q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    group = n_heads // n_kv
    split = split or split_size(s_max, n_kv)
    assert split % BLOCK_N == 0, split
    n_splits = triton.cdiv(s_max, split)
    if isinstance(pos, torch.Tensor):
        pos_t = pos.reshape(1).to(device=q.device, dtype=torch.int64)
    else:
        pos_t = torch.tensor([pos], dtype=torch.int64, device=q.device)
    pm = torch.empty((n_heads, n_splits), dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    pacc = torch.empty((n_heads, n_splits, D), dtype=torch.float32, device=q.device)
    o = torch.empty((1, n_heads, D), dtype=q.dtype, device=q.device)
    _split_kernel[(n_kv, n_splits)](q, k_cache, v_cache, pm, pl, pacc, pos_t, group, n_splits,
                                    LOG2E / math.sqrt(D), q.stride(1), s_max,
                                    BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, SPLIT=split,
                                    HEAD_D=D, num_warps=NUM_WARPS)
    _merge_kernel[(n_heads,)](pm, pl, pacc, o, pos_t, n_splits, o.stride(1),
                              SPLIT=split, BLOCK_S=BLOCK_S, HEAD_D=D, num_warps=NUM_WARPS)
    return o
