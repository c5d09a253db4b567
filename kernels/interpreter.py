"""`tl.dot` under Triton's CPU interpreter, in a fixed order (installed by kernels/__init__.py when
TRITON_INTERPRET=1).

The interpreter runs `tl.dot` as numpy's `matmul`, that is, the BLAS numpy was built with. A BLAS picks its
micro-kernel by shape, by a row's place in the block and by CPU (OpenBLAS's OPENBLAS_CORETYPE), so the same
row can get other bits in an M=1 product than in an M=64 one: the interpreter would then test numpy, not the
kernels. A GPU's MMA computes every output element of a tile with the same instruction sequence, whatever the
row. `fixed_order_dot` does the same on the CPU: each product a[i, k] * b[k, j] rounded to fp32, then the
products summed over k by one fixed pairwise tree. An element's bits then depend only on its own row of a and
column of b, on any CPU and any BLAS, so the CPU tests prove the kernels' own invariance: same tiles, same K
loop, same merge order."""
from __future__ import annotations

import numpy as np


def fixed_order_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [M, K] @ b [K, N], both float32: products, then a pairwise tree over k (the same for every M, N
    and every element: halves are added in place until one term is left, an odd last term carried up)."""
    terms = a[:, :, None] * b[None, :, :]  # [M, K, N] in float32, each product rounded once
    while terms.shape[1] > 1:
        half = terms.shape[1] // 2
        paired = terms[:, :half] + terms[:, half:2 * half]
        terms = paired if terms.shape[1] % 2 == 0 else np.concatenate([paired, terms[:, 2 * half:]], axis=1)
    return terms[:, 0, :]


def as_float32(t) -> np.ndarray:
    """An interpreter tensor of fp16/bf16/fp32 as float32 values (exact). The interpreter keeps bf16 as its raw
    uint16 bits, which numpy's matmul multiplies as integers; here they become the floats they stand for."""
    if t.dtype.is_bf16():
        return (t.data.astype(np.uint32) << 16).view(np.float32)
    return t.data.astype(np.float32)


def install() -> None:
    """Route the interpreter's float `tl.dot` through fixed_order_dot (others, e.g. integer dots, unchanged)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "greta_fixed_order", False):
        return
    numpy_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (a.dtype.is_floating() and b.dtype.is_floating() and a.dtype.primitive_bitwidth >= 16
                and d.data.dtype == np.float32):
            return numpy_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle(fixed_order_dot(as_float32(a), as_float32(b)) + d.data, d.dtype.scalar)

    create_dot.greta_fixed_order = True
    builder.create_dot = create_dot
