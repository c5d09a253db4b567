"""Triton kernels for Greta, imported as greta.kernels (see pyproject), and their torch references
(reference.py). The kernels need triton (pip install greta[gpu]); the references do not, and the torch
backends (greta/engine/ops) use them, so on a torch-only install this package holds the references alone."""
from .reference import (add_rmsnorm_ref, attention_ref, batch_decode_ref, matmul_ref, rmsnorm_ref, rope_ref,
                        sum_in_order_ref, swiglu_ref)

try:
    import triton  # noqa: F401
except ImportError:  # a torch-only install: greta.engine's torch backends need no more
    triton = None

if triton is not None:
    from .attention import BLOCK_KV, decode_attention, prefill_attention
    from .flash_decode import flash_decode, flash_decode_batch
    from .batch_attention import batch_decode_attention
    from .gemm import matmul
    from .norm import add_rmsnorm, rmsnorm
    from .reduce import sum_in_order
    from .rope import rope
    from .swiglu import swiglu

__all__ = [
    "BLOCK_KV", "prefill_attention", "decode_attention", "batch_decode_attention", "attention_ref", "batch_decode_ref",
    "flash_decode", "flash_decode_batch",
    "matmul", "matmul_ref",
    "rmsnorm", "rmsnorm_ref", "add_rmsnorm", "add_rmsnorm_ref",
    "rope", "rope_ref",
    "swiglu", "swiglu_ref",
    "sum_in_order", "sum_in_order_ref",
]
