"""Attention kernels under the Triton interpreter (CPU): accuracy vs the torch
reference, and decode == prefill bit for bit, including chunked prefill.

fp32 and fp16 only: the interpreter's bf16 tl.dot is wrong (bf16 is stored as
uint16 and multiplied as integers). bf16 runs in tests/test_kernels_gpu.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.kernels import attention  # noqa: E402
from greta.kernels.attention import decode_attention, prefill_attention  # noqa: E402
from greta.kernels.reference import attention_ref  # noqa: E402

if not isinstance(attention._attn_kernel, InterpretedFunction):
    pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1; run "
                "python -m pytest tests/test_kernels_*.py", allow_module_level=True)

# Small tiles so short sequences cross many blocks and splits; both paths use them.
SMALL = dict(block_m=16, block_kv=16, split_kv=32)
# (head_dim, n_heads, n_kv_heads): GQA ratios 1, 4, 8
SHAPES = [(64, 2, 2), (128, 4, 1), (64, 8, 1)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def poisoned(fn, *args, **kwargs):
    """Run fn with torch.empty/empty_like returning NaN-filled tensors (outputs
    and workspaces), so any element a kernel fails to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with mock.patch.object(torch, "empty", lambda *a, **k: nan(empty(*a, **k))), \
         mock.patch.object(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k))):
        return fn(*args, **kwargs)


def make(ctx, D, n_heads, n_kv, dtype, block_kv, seed):
    """Random q for positions 0..ctx-1 and a cache holding them; the cache tail
    past ctx is NaN, so reading it would show."""
    g = torch.Generator().manual_seed(seed)
    s_max = -(-(ctx + 5) // block_kv) * block_kv
    q = torch.randn(ctx, n_heads, D, generator=g).to(dtype)
    k = torch.randn(n_kv, s_max, D, generator=g).to(dtype)
    v = torch.randn(n_kv, s_max, D, generator=g).to(dtype)
    k[:, ctx:] = float("nan")
    v[:, ctx:] = float("nan")
    return q, k, v


def cut(cache, n):
    """Copy of cache with positions >= n poisoned (what a cache holds at that point)."""
    c = cache.clone()
    c[:, n:] = float("nan")
    return c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ctx", [37, 130])
@pytest.mark.parametrize("D,n_heads,n_kv", SHAPES)
def test_prefill_and_decode(D, n_heads, n_kv, ctx, dtype):
    q, k, v = make(ctx, D, n_heads, n_kv, dtype, SMALL["block_kv"], seed=1000 + ctx + D + n_heads)
    full = poisoned(prefill_attention, q, k, v, 0, **SMALL)
    assert full.shape == q.shape and full.dtype == dtype
    ref = attention_ref(q, k, v, 0)
    torch.testing.assert_close(full, ref, **TOL[dtype])
    # block / split edges (16, 32) on both sides, the middle, the last position
    for p in sorted({0, 1, 15, 16, 31, 32, 33, 63, 64, ctx // 2, ctx - 1} & set(range(ctx))):
        kp, vp = cut(k, p + 1), cut(v, p + 1)
        # pos as int, as a 0-d tensor, and as a 1-element int32 tensor
        pos = [p, torch.tensor(p), torch.tensor([p], dtype=torch.int32)][p % 3]
        o = poisoned(decode_attention, q[p:p + 1], kp, vp, pos, **SMALL)
        assert torch.equal(o[0], full[p]), f"decode at {p} differs from prefill row {p}"
        torch.testing.assert_close(o[0], ref[p], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D,n_heads,n_kv", SHAPES)
def test_chunked_prefill_equals_full(D, n_heads, n_kv, dtype):
    ctx = 130
    q, k, v = make(ctx, D, n_heads, n_kv, dtype, SMALL["block_kv"], seed=2000 + D + n_heads)
    full = poisoned(prefill_attention, q, k, v, 0, **SMALL)
    # chunk edges off every tile / block / split boundary, a 1-row chunk too
    edges = [0, 1, 7, 40, 41, 97, ctx]
    for a, b in zip(edges, edges[1:]):
        o = poisoned(prefill_attention, q[a:b], cut(k, b), cut(v, b), a, **SMALL)
        assert torch.equal(o, full[a:b]), f"chunk [{a}, {b}) differs from the full prefill"


# rows that have not reached a split meet exp2(-inf - -inf) = NaN in _merge, discarded by its tl.where
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_tile_wider_than_split():
    """A prefill tile whose rows sit in two splits: rows before the second split must skip its merge."""
    ctx, tiles = 100, dict(block_m=32, block_kv=16, split_kv=16)
    q, k, v = make(ctx, 64, 4, 2, torch.float32, 16, seed=8)
    full = poisoned(prefill_attention, q, k, v, 0, **tiles)
    torch.testing.assert_close(full, attention_ref(q, k, v, 0), **TOL[torch.float32])
    for p in [0, 15, 16, 31, 32, 47, 63, 64, 99]:
        o = poisoned(decode_attention, q[p:p + 1], cut(k, p + 1), cut(v, p + 1), p, **tiles)
        assert torch.equal(o[0], full[p]), p


def test_strided_q():
    """q as the first heads of a fused qkv tensor gives the same bits as a contiguous q."""
    ctx, n_heads = 37, 4
    q, k, v = make(ctx, 64, n_heads, 1, torch.float32, SMALL["block_kv"], seed=5)
    qkv = torch.cat([q, torch.randn(ctx, 2, 64)], dim=1)
    view = qkv[:, :n_heads]
    assert not view.is_contiguous()
    full = prefill_attention(q, k, v, 0, **SMALL)
    assert torch.equal(poisoned(prefill_attention, view, k, v, 0, **SMALL), full)
    assert torch.equal(poisoned(decode_attention, view[20:21], k, v, 20, **SMALL)[0], full[20])


def test_default_tiles():
    """The real BLOCK_M / BLOCK_KV / SPLIT_KV: ctx spans two splits."""
    ctx = attention.SPLIT_KV + 100
    q, k, v = make(ctx, 128, 1, 1, torch.float32, attention.BLOCK_KV, seed=3)
    full = poisoned(prefill_attention, q, k, v, 0)
    torch.testing.assert_close(full, attention_ref(q, k, v, 0), **TOL[torch.float32])
    for p in [0, 63, 64, attention.SPLIT_KV - 1, attention.SPLIT_KV, ctx - 1]:
        o = poisoned(decode_attention, q[p:p + 1], cut(k, p + 1), cut(v, p + 1), p)
        assert torch.equal(o[0], full[p]), p
    a = attention.SPLIT_KV - 64
    o = poisoned(prefill_attention, q[a:], k, v, a)
    assert torch.equal(o, full[a:])


@pytest.mark.parametrize("D,n_heads,n_kv", SHAPES)
def test_prefill_tma_launch(D, n_heads, n_kv, monkeypatch):
    """The prefill launch with TMA (tensor-descriptor) loads of K/V: accurate, keys past the chunk (NaN
    here) never leak in, and chunked == full. That its rows equal the pointer-load decode rows bit for
    bit is checked on the GPU (tests/test_kernels_gpu.py): the interpreter's dot differs by layout."""
    monkeypatch.setattr(attention, "PREFILL", (16, 4, 2, True))
    monkeypatch.setattr(attention, "_tma_ok", lambda k: True)
    ctx, tiles = 130, dict(block_kv=16, split_kv=32)
    q, k, v = make(ctx, D, n_heads, n_kv, torch.float32, 16, seed=6000 + D + n_heads)
    full = poisoned(prefill_attention, q, k, v, 0, **tiles)
    torch.testing.assert_close(full, attention_ref(q, k, v, 0), **TOL[torch.float32])
    for a, b in [(0, 41), (41, 97), (97, ctx)]:
        o = poisoned(prefill_attention, q[a:b], cut(k, b), cut(v, b), a, **tiles)
        assert torch.equal(o, full[a:b]), f"chunk [{a}, {b}) differs from the full prefill"


def test_negative_controls():
    """The bit-exact checks above can fail: nearby computations differ in bits."""
    ctx = 130
    q, k, v = make(ctx, 64, 4, 1, torch.float32, SMALL["block_kv"], seed=4)
    full = prefill_attention(q, k, v, 0, **SMALL)
    ps = [40, 77, 129]
    dec = {p: decode_attention(q[p:p + 1], k, v, p, **SMALL)[0] for p in ps}
    # 1. a naive full softmax (no splits) is close but not bit-equal
    ref = attention_ref(q, k, v, 0)
    assert any(not torch.equal(dec[p], ref[p]) for p in ps)
    for p in ps:
        torch.testing.assert_close(dec[p], ref[p], **TOL[torch.float32])
    # 2. decode at the wrong position (sees one key more or less)
    for p in ps:
        assert not torch.equal(decode_attention(q[p:p + 1], k, v, p - 1, **SMALL)[0], full[p])
    # 3. the split size is part of the definition: another SPLIT_KV changes bits
    other = prefill_attention(q, k, v, 0, **dict(SMALL, split_kv=16))
    assert not torch.equal(other, full)
    torch.testing.assert_close(other, full, **TOL[torch.float32])
