"""Triton kernels for Greta, imported as greta.kernels (see pyproject)."""
from .attention import BLOCK_KV, attention_ref, decode_attention, prefill_attention
from .gemm import matmul, matmul_ref
from .norm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from .rope import rope, rope_ref
from .swiglu import swiglu, swiglu_ref

__all__ = [
    "BLOCK_KV", "prefill_attention", "decode_attention", "attention_ref",
    "matmul", "matmul_ref",
    "rmsnorm", "rmsnorm_ref", "add_rmsnorm", "add_rmsnorm_ref",
    "rope", "rope_ref",
    "swiglu", "swiglu_ref",
]
