"""RMSNorm, RoPE and SwiGLU under the Triton interpreter (CPU), bf16 included
(these kernels use no tl.dot, so the interpreter's bf16 works here).

The interpreter rounds fp32 -> bf16 toward zero where the GPU rounds to
nearest even, so bf16 is checked to two units in the last place, not one;
exact bf16 rounding is checked in tests/test_kernels_gpu.py.
"""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.kernels import norm  # noqa: E402
from greta.kernels.norm import add_rmsnorm, rmsnorm  # noqa: E402
from greta.kernels.reference import add_rmsnorm_ref, rmsnorm_ref, rope_ref, swiglu_ref  # noqa: E402
from greta.kernels.rope import rope  # noqa: E402
from greta.kernels.swiglu import swiglu  # noqa: E402

if not isinstance(norm._rmsnorm_kernel, InterpretedFunction):
    pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1; run "
                "python -m pytest tests/test_kernels_*.py", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# about one unit in the last place of the output dtype (two for bf16, see above)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def poisoned(fn, *args, **kwargs):
    """Run fn with torch.empty/empty_like returning NaN-filled tensors, so any
    output element the kernel fails to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like
    with mock.patch.object(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan"))), \
         mock.patch.object(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan"))):
        return fn(*args, **kwargs)


def rand(*shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,block", [(1, 64, 1024), (6, 300, 128), (3, 4096, 1024)])
def test_rmsnorm(M, H, block, dtype):
    x, w = rand(M, H, dtype=dtype, seed=H), (1 + rand(H, dtype=torch.float32, seed=1, scale=0.1)).to(dtype)
    y = poisoned(rmsnorm, x, w, 1e-5, block=block)
    assert y.dtype == dtype
    torch.testing.assert_close(y, rmsnorm_ref(x, w, 1e-5), **TOL[dtype])
    assert torch.equal(poisoned(rmsnorm, x[M - 1:], w, 1e-5, block=block)[0], y[M - 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm(dtype):
    M, H = 5, 300
    x, r = rand(M, H, dtype=dtype, seed=1), rand(M, H, dtype=dtype, seed=2)
    w = (1 + rand(H, dtype=torch.float32, seed=3, scale=0.1)).to(dtype)
    y, new_r = poisoned(add_rmsnorm, x, r, w, 1e-6, block=128)
    y_ref, r_ref = add_rmsnorm_ref(x, r, w, 1e-6)
    if dtype == torch.bfloat16:  # interpreter truncates to bf16
        torch.testing.assert_close(new_r, r_ref, **TOL[dtype])
    else:  # one rounding of the fp32 sum, like torch
        assert torch.equal(new_r, r_ref)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(y, rmsnorm(new_r, w, 1e-6, block=128), rtol=0, atol=0)


def rope_tables(S, D, base=500000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,n_heads", [(64, 3), (128, 8)])
def test_rope(D, n_heads, dtype):
    S, M = 200, 9
    cos, sin = rope_tables(S, D)
    x = rand(M, n_heads, D, dtype=dtype, seed=D)
    pos = torch.tensor([0, 199, 5, 5, 64, 1, 150, 77, 3])  # unsorted, repeated
    y = poisoned(rope, x, cos, sin, pos)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, rope_ref(x, cos, sin, pos), **TOL[dtype])
    # a strided view (q out of a fused qkv row) and int32 positions
    qkv = rand(M, 2 * n_heads, D, dtype=dtype, seed=2)
    q = qkv[:, :n_heads]
    y2 = poisoned(rope, q, cos, sin, pos.to(torch.int32))
    torch.testing.assert_close(y2, rope_ref(q, cos, sin, pos), **TOL[dtype])
    # row 4 alone gives the same bits
    assert torch.equal(poisoned(rope, x[4:5], cos, sin, pos[4:5])[0], y[4])


def test_rope_rotates():
    """Position 0 is the identity; rotation keeps each (d, d + D/2) pair's norm."""
    cos, sin = rope_tables(16, 64)
    x = rand(2, 2, 64, dtype=torch.float32, seed=5)
    y = rope(x, cos, sin, torch.tensor([0, 9]))
    assert torch.equal(y[0], x[0])
    pair = lambda t: t[..., :32] ** 2 + t[..., 32:] ** 2  # noqa: E731
    torch.testing.assert_close(pair(y[1]), pair(x[1]))
    assert not torch.allclose(y[1], x[1])
    assert math.isclose(float(cos[9, 0]), math.cos(9.0), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,n,block", [(1, 100, 1024), (4, 3000, 1024), (3, 70, 32)])
def test_swiglu(M, n, block, dtype):
    g, u = rand(M, n, dtype=dtype, seed=n, scale=3.0), rand(M, n, dtype=dtype, seed=n + 1)
    y = poisoned(swiglu, g, u, block=block)
    assert y.dtype == dtype
    torch.testing.assert_close(y, swiglu_ref(g, u), **TOL[dtype])
    # gate and up as the two halves of one fused matmul output
    gu = torch.cat([g, u], dim=1)
    assert torch.equal(poisoned(swiglu, gu[:, :n], gu[:, n:], block=block), y)
