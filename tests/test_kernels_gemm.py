"""GEMM kernel under the Triton interpreter (CPU): accuracy vs torch, M=1,
K/N off the tiles, and batch invariance (a row's bits do not depend on M).

fp32 and fp16 only: the interpreter's bf16 tl.dot is wrong. bf16 runs in
tests/test_kernels_gpu.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.kernels import gemm  # noqa: E402
from greta.kernels.gemm import matmul  # noqa: E402
from greta.kernels.reference import matmul_ref  # noqa: E402

if not isinstance(gemm._matmul_kernel, InterpretedFunction):
    pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1; run "
                "python -m pytest tests/test_kernels_*.py", allow_module_level=True)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-2)}


def poisoned(fn, *args, **kwargs):
    """Run fn with torch.empty returning NaN-filled tensors, so any output
    element the kernel fails to write shows up."""
    empty = torch.empty
    with mock.patch.object(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan"))):
        return fn(*args, **kwargs)


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 300, 200), (77, 300, 200), (130, 129, 64), (5, 17, 33)])
def test_matmul_matches_ref(M, N, K, dtype):
    x, w = rand(M, K, dtype=dtype, seed=M), rand(N, K, dtype=dtype, seed=N + K)
    y = poisoned(matmul, x, w)
    assert y.shape == (M, N) and y.dtype == dtype
    torch.testing.assert_close(y, matmul_ref(x, w), **TOL[dtype])


def test_matmul_strided_input():
    """x may be a column slice of a wider tensor (row stride != K)."""
    big = rand(9, 300, dtype=torch.float32, seed=1)
    x, w = big[:, 50:250], rand(70, 200, dtype=torch.float32, seed=2)
    torch.testing.assert_close(poisoned(matmul, x, w), matmul_ref(x, w), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_batch_invariant(dtype):
    """Row i of the product has the same bits for M=1, M=77 and M=200."""
    N, K = 300, 200
    x, w = rand(200, K, dtype=dtype, seed=7), rand(N, K, dtype=dtype, seed=8)
    big = poisoned(matmul, x, w)
    assert torch.equal(poisoned(matmul, x[:77], w), big[:77])
    for i in [0, 1, 76, 127, 128, 199]:   # rows at several places in their tile
        assert torch.equal(poisoned(matmul, x[i:i + 1], w)[0], big[i]), i


def test_matmul_small_tiles():
    """Several M, N and K tiles with ragged edges."""
    x, w = rand(37, 45, dtype=torch.float32, seed=3), rand(50, 45, dtype=torch.float32, seed=4)
    y = poisoned(matmul, x, w, block_m=16, block_n=16, block_k=16)
    torch.testing.assert_close(y, matmul_ref(x, w), **TOL[torch.float32])
