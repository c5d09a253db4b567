"""Causal GQA attention over a KV cache; decode is bit-identical to prefill.

KV cache per layer: k_cache, v_cache [n_kv_heads, S_max, D] contiguous,
S_max a multiple of BLOCK_KV. Query head h reads kv head h // (n_heads // n_kv_heads).

Attention of one query row at absolute position p is DEFINED as:
  for each split s = [s*SPLIT_KV, (s+1)*SPLIT_KV) with s*SPLIT_KV <= p, in order:
      (m_s, l_s, acc_s) = online softmax over the split's BLOCK_KV blocks
                          with a block start <= p, in order (keys > p masked)
      (m, l, acc) = merge((m, l, acc), (m_s, l_s, acc_s))
  o = acc / l
Query rows sit in BLOCK_M-row tiles aligned to absolute positions (row p is
row p % BLOCK_M of its tile), so the tl.dot shapes and a row's place in them
are the same in both paths.

One kernel, _attn_kernel, computes the split partials for both paths:
  prefill: one program per (query tile, head) walks all blocks in ONE loop,
           merging each split's partial in registers as the next split
           begins (_prefill_rows), then writes o.
  decode:  one program per (kv head, split), its rows the GQA group's query
           heads, writes each head's split partial to a workspace; _merge_kernel
           merges them in split order with the same _merge code. pos is read
           from a device tensor (CUDA-graph friendly).
The two launches share BLOCK_KV, SPLIT_KV, num_warps and the MMA; prefill
pipelines deeper and loads K/V by TMA on sm_90+ (PREFILL below).
See docs/KERNELS.md for why the bits agree.
"""
import math

import torch
import triton
import triton.language as tl

BLOCK_M = 64     # query rows per tile (prefill: 64 positions; decode: the GQA group's heads)
BLOCK_KV = 64    # keys per block; callers align S_max of the cache to this
SPLIT_KV = 1024  # keys per split (a multiple of BLOCK_KV)
NUM_WARPS = 4    # decode's launch, and prefill's unless PREFILL says otherwise
NUM_STAGES = 3   # decode's
# Prefill launch: BLOCK_M, num_warps, num_stages, TMA loads of K/V (CUDA sm_90+ only; elsewhere pointer
# loads). A row's arithmetic does not depend on these (the same argument as the GEMM's tiles, and checked
# the same way on the GPU: tests/test_kernels_gpu.py, bench/sweep_attention.py); BLOCK_KV and SPLIT_KV it does.
PREFILL = (64, 4, 3, True)
# H100, 2026-11-26 (bench/sweep_attention.py): with one loop per split the software pipeline drained every
# split (346 TFLOP/s for the last 32k prefill chunk at SPLIT_KV 512, 483 at 4096). _prefill_rows walks all
# splits in one loop: 474 TFLOP/s at 1024, where decode has 8x more programs than at 4096 (0.118 ms per
# layer at 32k, 0.088 at 4k).
LOG2E = 1.4426950408889634


@triton.jit
def _block_update(q, K, V, kv_row, p, b_lo, hi, m, l, acc, qk_scale, EDGE: tl.constexpr,
                  BLOCK_KV: tl.constexpr, HEAD_D: tl.constexpr, TMA: tl.constexpr):
    """One online-softmax step over keys [b_lo, b_lo + BLOCK_KV). EDGE=False is for blocks every row of the
    tile sees in full (all keys <= every row's p, all < hi): the masks and the per-row guard would select
    the unmasked values anyway, so skipping them leaves every bit as it is. K, V: the cache as pointers, or
    (TMA) as tensor descriptors over [n_kv * S_max, HEAD_D]; kv_row is the kv head's first row in it.
    Keys >= hi read as 0 either way."""
    d = tl.arange(0, HEAD_D)
    j = b_lo + tl.arange(0, BLOCK_KV)
    if TMA:
        k = K.load([(kv_row + b_lo).to(tl.int32), 0])
        v = V.load([(kv_row + b_lo).to(tl.int32), 0])
        if EDGE:
            k = tl.where(j[:, None] < hi, k, 0.0)
            v = tl.where(j[:, None] < hi, v, 0.0)
        kt = k.T
    else:
        k_base = K + kv_row * HEAD_D
        if EDGE:
            kt = tl.load(k_base + j[None, :].to(tl.int64) * HEAD_D + d[:, None], mask=(j < hi)[None, :], other=0.0)
        else:
            kt = tl.load(k_base + j[None, :].to(tl.int64) * HEAD_D + d[:, None])
    s = tl.dot(q, kt) * qk_scale
    if EDGE:
        s = tl.where(j[None, :] <= p[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    pr = tl.exp2(s - m_new[:, None])
    l_new = l * alpha + tl.sum(pr, 1)
    if not TMA:
        v_base = V + kv_row * HEAD_D
        if EDGE:
            v = tl.load(v_base + j[:, None].to(tl.int64) * HEAD_D + d[None, :], mask=(j < hi)[:, None], other=0.0)
        else:
            v = tl.load(v_base + j[:, None].to(tl.int64) * HEAD_D + d[None, :])
    acc_new = tl.dot(pr.to(v.dtype), v, acc * alpha[:, None])
    if EDGE:
        active = b_lo <= p
        return tl.where(active, m_new, m), tl.where(active, l_new, l), tl.where(active[:, None], acc_new, acc)
    return m_new, l_new, acc_new


@triton.jit
def _split_partial(q, K, V, kv_row, p, p_min, lo, hi, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, HEAD_D: tl.constexpr, TMA: tl.constexpr):
    """Online softmax of the tile's rows over keys [lo, hi), blocks in order.

    hi <= max p of the tile + 1; keys >= hi are not read. A row only takes the
    update of blocks that start at or before its position p: later blocks are
    skipped for it (the tl.where in _block_update), so the row's state is the
    same whatever other rows share the tile. Blocks that end at or before the
    tile's smallest p (p_min) need neither that guard nor the causal mask.
    """
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
    full_hi = tl.maximum(lo, tl.minimum(hi, (p_min + 1) // BLOCK_KV * BLOCK_KV))
    for b_lo in range(lo, full_hi, BLOCK_KV):
        m, l, acc = _block_update(q, K, V, kv_row, p, b_lo, hi, m, l, acc, qk_scale, False, BLOCK_KV, HEAD_D, TMA)
    for b_lo in range(full_hi, hi, BLOCK_KV):
        m, l, acc = _block_update(q, K, V, kv_row, p, b_lo, hi, m, l, acc, qk_scale, True, BLOCK_KV, HEAD_D, TMA)
    return m, l, acc


@triton.jit
def _merge(m, l, acc, m_s, l_s, acc_s, valid):
    """Fold partial (m_s, l_s, acc_s) into the running (m, l, acc) where valid."""
    m_new = tl.maximum(m, m_s)
    a = tl.exp2(m - m_new)
    b = tl.exp2(m_s - m_new)
    l_new = l * a + l_s * b
    acc_new = acc * a[:, None] + acc_s * b[:, None]
    return (tl.where(valid, m_new, m), tl.where(valid, l_new, l),
            tl.where(valid[:, None], acc_new, acc))


@triton.jit
def _prefill_rows(q, K, V, kv_row, p, p_max, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, SPLIT_KV: tl.constexpr, HEAD_D: tl.constexpr,
                  TMA: tl.constexpr):
    """All splits of a prefill tile as ONE loop over blocks (so the software pipeline never drains): the
    split partial is folded into the running state with _merge when a new split begins, and after the last
    block. Per row this is the same sequence of operations as _split_partial per split, then _merge."""
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    acc_s = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
    hi = p_max + 1
    full_end = (tl.min(p, 0) + 1) // BLOCK_KV * BLOCK_KV  # blocks below it are whole for every row
    for b_lo in range(0, full_end, BLOCK_KV):
        m, l, acc, m_s, l_s, acc_s = _split_boundary(m, l, acc, m_s, l_s, acc_s, p, b_lo, BLOCK_M, SPLIT_KV, HEAD_D)
        m_s, l_s, acc_s = _block_update(q, K, V, kv_row, p, b_lo, hi, m_s, l_s, acc_s, qk_scale, False,
                                        BLOCK_KV, HEAD_D, TMA)
    for b_lo in range(full_end, hi, BLOCK_KV):
        m, l, acc, m_s, l_s, acc_s = _split_boundary(m, l, acc, m_s, l_s, acc_s, p, b_lo, BLOCK_M, SPLIT_KV, HEAD_D)
        m_s, l_s, acc_s = _block_update(q, K, V, kv_row, p, b_lo, hi, m_s, l_s, acc_s, qk_scale, True,
                                        BLOCK_KV, HEAD_D, TMA)
    return _merge(m, l, acc, m_s, l_s, acc_s, p_max // SPLIT_KV * SPLIT_KV <= p)


@triton.jit
def _split_boundary(m, l, acc, m_s, l_s, acc_s, p, b_lo,
                    BLOCK_M: tl.constexpr, SPLIT_KV: tl.constexpr, HEAD_D: tl.constexpr):
    """Where block b_lo begins a new split: fold the finished split's partial into the running state (rows
    that reached it), then start the new split's partial empty."""
    if (b_lo % SPLIT_KV == 0) & (b_lo > 0):
        m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s, b_lo - SPLIT_KV <= p)
        m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_s = tl.zeros((BLOCK_M,), tl.float32)
        acc_s = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
    return m, l, acc, m_s, l_s, acc_s


# T is not specialised: every chunk length runs the same prefill binary.
@triton.jit(do_not_specialize=["T"])
def _attn_kernel(Q, K, V, O, PM, PL, PACC, START, T, group, n_splits, qk_scale,
                 stride_qt, stride_qh, stride_ot, stride_oh, s_max,
                 BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, SPLIT_KV: tl.constexpr,
                 HEAD_D: tl.constexpr, TMA: tl.constexpr, DECODE: tl.constexpr):
    # Prefill: program (tile, query head, 0); row r is position tile_lo + r; all splits, merged in registers.
    # Decode: program (0, kv head, split); row r is query head kv*group + r, all at position START, so one
    # program reads its K/V split once for the whole GQA group, and writes the raw split partial. A row's
    # arithmetic (its dot row, its row max/sum, its masks) is the same either way; only which rows share a
    # tile differs.
    pid_m = tl.program_id(0)
    hp = tl.program_id(1)
    pid_s = tl.program_id(2)
    start = tl.load(START)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_D)
    if DECODE:
        p = start + r * 0
        hrow = hp * group + r
        row_ok = r < group
        p_max = start
        kv_row = hp.to(tl.int64) * s_max
    else:
        tile_lo = (start // BLOCK_M + pid_m) * BLOCK_M
        p = tile_lo + r
        hrow = hp + r * 0
        row_ok = (p >= start) & (p < start + T)
        p_max = tl.minimum(tile_lo + BLOCK_M, start + T) - 1
        kv_row = (hp // group).to(tl.int64) * s_max
    t = p - start
    q = tl.load(Q + t[:, None] * stride_qt + hrow[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    if DECODE:
        s_lo = pid_s * SPLIT_KV
        if s_lo <= p_max:
            m_s, l_s, acc_s = _split_partial(q, K, V, kv_row, p, start, s_lo, tl.minimum(s_lo + SPLIT_KV, p_max + 1),
                                             qk_scale, BLOCK_M, BLOCK_KV, HEAD_D, TMA)
            w = hrow * n_splits + pid_s
            tl.store(PM + w, m_s, mask=row_ok)
            tl.store(PL + w, l_s, mask=row_ok)
            tl.store(PACC + w[:, None] * HEAD_D + d[None, :], acc_s, mask=row_ok[:, None])
    else:
        m, l, acc = _prefill_rows(q, K, V, kv_row, p, p_max, qk_scale, BLOCK_M, BLOCK_KV, SPLIT_KV, HEAD_D, TMA)
        o = acc / l[:, None]
        tl.store(O + t[:, None] * stride_ot + hp * stride_oh + d[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit
def _merge_kernel(PM, PL, PACC, O, POS, n_splits, stride_oh,
                  SPLIT_KV: tl.constexpr, HEAD_D: tl.constexpr):
    """Decode: merge the partials of splits 0..pos // SPLIT_KV of head h, in order."""
    h = tl.program_id(0)
    pos = tl.load(POS)
    r = tl.arange(0, 1)
    d = tl.arange(0, HEAD_D)
    m = tl.full((1,), float("-inf"), tl.float32)
    l = tl.zeros((1,), tl.float32)
    acc = tl.zeros((1, HEAD_D), tl.float32)
    for s in range(0, pos // SPLIT_KV + 1):
        w = h * n_splits + s + r
        m_s = tl.load(PM + w)
        l_s = tl.load(PL + w)
        acc_s = tl.load(PACC + w[:, None] * HEAD_D + d[None, :])
        m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s, r >= 0)
    o = acc / l[:, None]
    tl.store(O + h * stride_oh + r[:, None] * 0 + d[None, :], o.to(O.dtype.element_ty))


def _check(q, k_cache, v_cache, block_kv, split_kv):
    T, n_heads, D = q.shape
    n_kv, s_max, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and D == triton.next_power_of_2(D), (q.shape, k_cache.shape)
    assert n_heads % n_kv == 0 and q.stride(2) == 1, (n_heads, n_kv, q.stride())
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.stride(0) == s_max * D
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    assert s_max % block_kv == 0 and split_kv % block_kv == 0, (s_max, block_kv, split_kv)
    return T, n_heads, D, n_heads // n_kv, triton.cdiv(s_max, split_kv)


def _tma_ok(k_cache) -> bool:
    return (k_cache.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(k_cache.device)[0] >= 9
            and k_cache.shape[0] * k_cache.shape[1] < 2 ** 31)


def _launch(q, k_cache, v_cache, o, parts, start_t, T, grid, decode, block_m, block_kv, split_kv,
            num_warps, num_stages, tma):
    _, n_heads, D, group, n_splits = _check(q, k_cache, v_cache, block_kv, split_kv)
    n_kv, s_max, _ = k_cache.shape
    pm, pl, pacc = parts
    assert o.stride(2) == 1
    k, v = k_cache, v_cache
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor as TD

        k = TD.from_tensor(k_cache.view(n_kv * s_max, D), [block_kv, D])
        v = TD.from_tensor(v_cache.view(n_kv * s_max, D), [block_kv, D])
    _attn_kernel[grid](q, k, v, o, pm, pl, pacc, start_t, T, group, n_splits, LOG2E / math.sqrt(D),
                       q.stride(0), q.stride(1), o.stride(0), o.stride(1), s_max,
                       BLOCK_M=block_m, BLOCK_KV=block_kv, SPLIT_KV=split_kv, HEAD_D=D, TMA=tma, DECODE=decode,
                       num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)


def prefill_attention(q, k_cache, v_cache, start, *, start_t=None, block_m=None, block_kv=None, split_kv=None):
    """q [T, n_heads, D] at positions start..start+T-1 -> o [T, n_heads, D].

    The cache must hold keys/values for positions 0..start+T-1. start_t: start already on q's device (a
    1-element int64 tensor, e.g. a view of the step's positions); without it start is copied there, and a
    copy from pageable host memory holds the host until the stream reaches it, which idled an H100 for
    0.24 ms before every launch (bench/profile_prefill.py). The block_* and split_kv overrides exist for
    tests; decode must use the same block_kv and split_kv. An explicit block_m runs the decode launch.
    """
    block_kv, split_kv = block_kv or BLOCK_KV, split_kv or SPLIT_KV
    if block_m is None:
        block_m, num_warps, num_stages, tma = PREFILL
        tma = tma and _tma_ok(k_cache)
    else:
        num_warps, num_stages, tma = NUM_WARPS, NUM_STAGES, False
    T, n_heads, D, _, n_splits = _check(q, k_cache, v_cache, block_kv, split_kv)
    o = torch.empty((T, n_heads, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return o
    if start_t is None:
        start_t = torch.tensor([start], dtype=torch.int64, device=q.device)
    n_tiles = triton.cdiv(start + T, block_m) - start // block_m
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    _launch(q, k_cache, v_cache, o, (dummy, dummy, dummy), start_t, T, (n_tiles, n_heads, 1), False,
            block_m, block_kv, split_kv, num_warps, num_stages, tma)
    return o


def decode_attention(q, k_cache, v_cache, pos, *, block_m=None, block_kv=None, split_kv=None):
    """q [1, n_heads, D] at position pos -> o [1, n_heads, D].

    pos: python int, or a 0-d / 1-element int tensor on q's device (preferred:
    no host sync, so the step can be CUDA-graph captured). The grid covers all
    S_max // SPLIT_KV splits; programs past pos return at once.
    """
    block_m, block_kv, split_kv = block_m or BLOCK_M, block_kv or BLOCK_KV, split_kv or SPLIT_KV
    T, n_heads, D, _, n_splits = _check(q, k_cache, v_cache, block_kv, split_kv)
    assert T == 1, q.shape
    if isinstance(pos, torch.Tensor):
        pos_t = pos.reshape(1).to(device=q.device, dtype=torch.int64)
    else:
        pos_t = torch.tensor([pos], dtype=torch.int64, device=q.device)
    o = torch.empty((1, n_heads, D), dtype=q.dtype, device=q.device)
    pm = torch.empty((n_heads, n_splits), dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    pacc = torch.empty((n_heads, n_splits, D), dtype=torch.float32, device=q.device)
    assert n_heads // k_cache.shape[0] <= block_m, "a GQA group must fit in one query tile"
    _launch(q, k_cache, v_cache, o, (pm, pl, pacc), pos_t, 1, (1, k_cache.shape[0], n_splits), True,
            block_m, block_kv, split_kv, NUM_WARPS, NUM_STAGES, False)
    _merge_kernel[(n_heads,)](pm, pl, pacc, o, pos_t, n_splits, o.stride(1),
                              SPLIT_KV=split_kv, HEAD_D=D, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return o
