"""The interpreter's tl.dot (kernels/interpreter.py): a row's bits don't depend on its place in the tile, the
number of rows, or numpy's BLAS; and the order it fixes is a real choice (another order gives other bits)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from greta.kernels.interpreter import fixed_order_dot  # noqa: E402

rng = np.random.default_rng(0)


def test_a_row_has_the_same_bits_alone_and_at_any_place_in_a_tile():
    a, b = rng.standard_normal((64, 128), np.float32), rng.standard_normal((128, 96), np.float32)
    full = fixed_order_dot(a, b)
    for row in (0, 1, 31, 63):
        assert np.array_equal(fixed_order_dot(a[row:row + 1], b)[0], full[row])
        assert np.array_equal(fixed_order_dot(a[row:], b[:, 5:17])[0], full[row, 5:17])


def test_close_to_the_exact_product_and_odd_k():
    for k in (1, 3, 64, 77):
        a, b = rng.standard_normal((16, k), np.float32), rng.standard_normal((k, 8), np.float32)
        exact = a.astype(np.float64) @ b.astype(np.float64)
        assert np.allclose(fixed_order_dot(a, b), exact, rtol=1e-5, atol=1e-5)


def test_the_order_is_a_choice_another_order_differs():
    """Negative control: summing the same products left to right gives other bits somewhere, so a kernel that
    changed its K order would be caught."""
    a, b = rng.standard_normal((64, 128), np.float32), rng.standard_normal((128, 64), np.float32)
    in_order = np.zeros((64, 64), np.float32)
    for k in range(128):
        in_order += a[:, k:k + 1] * b[k:k + 1, :]
    assert not np.array_equal(in_order, fixed_order_dot(a, b))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tl_dot_under_the_interpreter_is_the_fixed_order_dot(dtype):
    """Through a real kernel: bits equal to fixed_order_dot of the same values; bf16 too (the interpreter's own
    dot multiplies bf16's raw bits as integers)."""
    a, b = torch.randn(16, 32).to(dtype), torch.randn(32, 16).to(dtype)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, 16, 32, 16)
    want = fixed_order_dot(a.float().numpy(), b.float().numpy())
    assert np.array_equal(c.numpy(), want)
    assert torch.allclose(c.double(), a.double() @ b.double(), rtol=1e-4, atol=1e-4)
