"""Compiled (not interpreted) kernels on a GPU, bf16, Llama-3-8B shapes:
accuracy vs the torch references and decode == prefill bit for bit.

This module does not set TRITON_INTERPRET. If the interpreter test modules
already switched this process to the interpreter (python -m pytest tests/),
the one test here that runs reruns this file in a clean process (the
interpreter also leaves triton.language patched, which breaks compiling).
"""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA/ROCm device", allow_module_level=True)
pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

from greta.kernels import attention, gemm  # noqa: E402
from greta.kernels.attention import decode_attention, prefill_attention  # noqa: E402
from greta.kernels.gemm import matmul  # noqa: E402
from greta.kernels.norm import add_rmsnorm, rmsnorm  # noqa: E402
from greta.kernels.reference import (add_rmsnorm_ref, attention_ref, matmul_ref, rmsnorm_ref, rope_ref,  # noqa: E402
                                     swiglu_ref)
from greta.kernels.rope import rope  # noqa: E402
from greta.kernels.swiglu import swiglu  # noqa: E402

compiled = pytest.mark.skipif(INTERPRETED, reason="this process runs Triton interpreted")

DEV = "cuda"
DTYPE = torch.bfloat16
HIDDEN, INTER, VOCAB = 4096, 14336, 128256
N_HEADS, N_KV, D = 32, 8, 128
CTX = 32768
BF16 = dict(rtol=1.6e-2, atol=1.6e-2)  # about two units in the last place


@pytest.mark.skipif(not INTERPRETED, reason="already in a compiled process")
def test_compiled_kernels_in_clean_process():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def rand(*shape, seed, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, device=DEV)).to(DTYPE)


@compiled
def test_kernels_are_compiled():
    assert type(gemm._matmul_kernel).__name__ == "JITFunction"
    assert type(attention._attn_kernel).__name__ == "JITFunction"


@compiled
@pytest.mark.parametrize("N,K", [(6144, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER), (VOCAB, HIDDEN)])
def test_matmul(N, K):
    M = 512
    x, w = rand(M, K, seed=N), rand(N, K, seed=K, scale=K ** -0.5)
    y = matmul(x, w)
    torch.testing.assert_close(y, matmul_ref(x, w), **BF16)
    # batch invariance: a row's bits do not depend on M or on its place in the tile
    assert torch.equal(matmul(x[:77], w), y[:77])
    for i in [0, 1, 100, 127, 128, 300, M - 1]:
        assert torch.equal(matmul(x[i:i + 1], w)[0], y[i]), i


@compiled
@pytest.mark.parametrize("N,K", [(HIDDEN, HIDDEN), (HIDDEN, INTER)])
def test_matmul_tree_decode_is_prefill(N, K):
    """The tp-invariant mode's wo and w2 (S = 8): decode's split tree (a program per segment, then the tree
    kernel) gives prefill's rows (one program per tile, the tree in registers) bit for bit, in bf16 and in
    the fp32 a rank sends; the plain K loop does not (the control)."""
    from greta.kernels.gemm_tree import matmul_tree
    from greta.kernels.reference import tree_sum_ref

    M = 512
    x, w = rand(M, K, seed=N + 1), rand(N, K, seed=K + 1, scale=K ** -0.5)
    for dtype in (DTYPE, torch.float32):
        y = matmul_tree(x, w, 8, out_dtype=dtype)
        for i in [0, 1, 100, 127, 300, M - 1]:
            row = matmul_tree(x[i:i + 1], w, 8, out_dtype=dtype)
            assert torch.equal(row[0], y[i]), (dtype, i)
            assert torch.equal(row, matmul_tree(x[i:i + 1], w, 8, out_dtype=dtype, split=False)), (dtype, i)
    n = K // 8
    parts = [(x[:4, s * n:(s + 1) * n].float() @ w[:, s * n:(s + 1) * n].float().T) for s in range(8)]
    torch.testing.assert_close(y[:4], tree_sum_ref(parts), rtol=1e-4, atol=1e-4)
    assert not torch.equal(matmul(x[:4], w), matmul_tree(x[:4], w, 8))


@compiled
def test_elementwise():
    M = 512
    x, r = rand(M, HIDDEN, seed=1), rand(M, HIDDEN, seed=2)
    w = (1 + rand(HIDDEN, seed=3, scale=0.1).float()).to(DTYPE)
    torch.testing.assert_close(rmsnorm(x, w, 1e-5), rmsnorm_ref(x, w, 1e-5), **BF16)
    y, new_r = add_rmsnorm(x, r, w, 1e-5)
    y_ref, r_ref = add_rmsnorm_ref(x, r, w, 1e-5)
    assert torch.equal(new_r, r_ref)  # round-to-nearest-even on the GPU
    torch.testing.assert_close(y, y_ref, **BF16)
    assert torch.equal(rmsnorm(x[5:6], w, 1e-5)[0], rmsnorm(x, w, 1e-5)[5])

    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device=DEV) / D)
    ang = torch.arange(CTX, dtype=torch.float64, device=DEV)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    pos = torch.randint(0, CTX, (M,), device=DEV)
    q = rand(M, N_HEADS, D, seed=4)
    qr = rope(q, cos, sin, pos)
    torch.testing.assert_close(qr, rope_ref(q, cos, sin, pos), **BF16)
    assert torch.equal(rope(q[7:8], cos, sin, pos[7:8])[0], qr[7])

    g, u = rand(M, INTER, seed=5, scale=3.0), rand(M, INTER, seed=6)
    torch.testing.assert_close(swiglu(g, u), swiglu_ref(g, u), **BF16)


@pytest.fixture(scope="module")
def seq():
    """q for positions 0..CTX-1, a full cache, and the prefill over all of it."""
    q = rand(CTX, N_HEADS, D, seed=10)
    k = rand(N_KV, CTX, D, seed=11)
    v = rand(N_KV, CTX, D, seed=12)
    return q, k, v, prefill_attention(q, k, v, 0)


@compiled
def test_prefill_matches_ref(seq):
    q, k, v, full = seq
    for a in [0, CTX // 8, CTX - 8]:
        torch.testing.assert_close(full[a:a + 8], attention_ref(q[a:a + 8], k, v, a), **BF16)


@compiled
def test_decode_equals_prefill(seq):
    q, k, v, full = seq
    split = attention.SPLIT_KV
    for p in [0, 1, 63, 64, split - 1, split, split + 1, CTX // 8 - 1, CTX // 2, CTX - 1]:
        o = decode_attention(q[p:p + 1], k, v, torch.tensor(p, device=DEV))
        assert torch.equal(o[0], full[p]), p
    # a cache holding only 0..p (NaN past it) gives the same bits
    for p in [1000, CTX - 2]:
        kp, vp = k.clone(), v.clone()
        kp[:, p + 1:] = float("nan")
        vp[:, p + 1:] = float("nan")
        assert torch.equal(decode_attention(q[p:p + 1], kp, vp, p)[0], full[p]), p


@compiled
def test_chunked_prefill_equals_full(seq):
    q, k, v, full = seq
    edges = [0, 1000, CTX // 2 + 27, CTX - 1, CTX]
    for a, b in zip(edges, edges[1:]):
        assert torch.equal(prefill_attention(q[a:b], k, v, a), full[a:b]), (a, b)


@compiled
def test_decode_cuda_graph(seq):
    """The decode step captures into a CUDA graph: pos is read on the device."""
    q, k, v, full = seq
    q1 = q[:1].clone()
    pos = torch.zeros(1, dtype=torch.int64, device=DEV)
    decode_attention(q1, k, v, pos)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q1, k, v, pos)
    for p in [5, 700, CTX - 1]:
        q1.copy_(q[p:p + 1])
        pos.fill_(p)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], full[p]), p


# ----------------------------------------------------------------------------- the kv_aligned=0 fast path
@compiled
def test_flash_decode_matches_ref_and_graph(seq):
    """kv0's flash-decoding (greta.kernels.flash_decode) against the reference, eager and replayed from a
    CUDA graph at positions it was not captured at; one key short must be further off (negative control)."""
    from greta.kernels.flash_decode import flash_decode

    q, k, v, _ = seq
    for p in [0, 255, 256, 5000, CTX - 1]:
        ref = attention_ref(q[p:p + 1], k, v, p)
        torch.testing.assert_close(flash_decode(q[p:p + 1], k, v, torch.tensor([p], device=DEV)), ref, **BF16)
    q1, pos = q[:1].clone(), torch.zeros(1, dtype=torch.int64, device=DEV)
    flash_decode(q1, k, v, pos)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_decode(q1, k, v, pos)
    for p in [7, 3000, CTX - 1]:
        q1.copy_(q[p:p + 1])
        pos.fill_(p)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, attention_ref(q[p:p + 1], k, v, p), **BF16)
    short = flash_decode(q[9:10], k, v, torch.tensor([8], device=DEV))
    assert (short.float() - attention_ref(q[9:10], k, v, 9).float()).abs().max() > 5e-2


@compiled
def test_kv0_sdpa_prefill_matches_ref(seq):
    """kv0's prefill attention (greta/engine/ops/sdpa.py: prefix + diagonal merged by log-sum-exp) against
    the reference for a first and a later chunk; prints which backend ran each part."""
    from greta.engine.ops.sdpa import Attention

    q, k, v, _ = seq
    a = Attention()
    for start, T in [(0, 2048), (CTX - 2048, 2048), (5000, 333)]:
        o = a(q[start:start + T].transpose(0, 1)[None], k[None, :, :start + T], v[None, :, :start + T], start)
        o = o[0].transpose(0, 1)
        for r in [0, T // 2, T - 1]:
            torch.testing.assert_close(o[r:r + 1], attention_ref(q[start + r:start + r + 1], k, v, start + r), **BF16)
    print("kv0 prefill attention backends:", a.backends)
    assert a.backends["diagonal"] in ("cudnn", "flash", "efficient"), a.backends


@compiled
def test_kv0_runner_decode_graph_matches_eager():
    """The kv0 runner on CUDA captures its decode step (CudaFastOps.graphable); replayed logits match an
    eager decode of the same step on a second runner (both read the same prefill)."""
    from greta.engine.config import PRESETS
    from greta.engine.prompt import synthetic_prompt
    from greta.engine.runner import Runner
    from greta.engine.weights import synthetic

    cfg = PRESETS["tiny"]
    w = synthetic(cfg, 0, DTYPE, DEV)
    prompt = synthetic_prompt(300, cfg.vocab_size, 0).to(DEV)
    a, b = (Runner(cfg, w, max_tokens=310, kv_aligned=0, chunk=128, kv_block=128) for _ in range(2))
    assert a.graphable and type(a.ops).__name__ == "CudaFastOps"
    b.graphable = False
    a.prefill(prompt[:296]), b.prefill(prompt[:296])
    for j in range(4):
        la, lb = a.decode(prompt[296 + j], 296 + j), b.decode(prompt[296 + j], 296 + j)
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-3)
    assert a._graphs.captured() == {"one"}  # decode ran from its CUDA graph
