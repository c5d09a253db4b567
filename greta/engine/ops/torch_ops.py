"""The kv_aligned=0 path in plain torch (the CPU's; CUDA runs its subclass CudaFastOps, cuda_fast.py): the
fastest op per path, so prefill and decode round differently (the drift the probe is there to see).

prefill: full-chunk matmuls and SDPA over the cache prefix (sdpa.py: GQA by the kernel, no K/V copies, no
mask tensor); decode: M=1 matmuls and a plain softmax(q K^T) V for the one query over keys 0..pos (the
host reads pos: free on the CPU). RMSNorm and RoPE are the kernels' torch references (greta.kernels
reference.py, importable without triton): the same bits as the formulas this path always used, kept in one
place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from greta.engine.ops.base import Ops, Step
from greta.engine.ops.sdpa import Attention
from greta.kernels.reference import rmsnorm_ref, rope_rows_ref


class TorchOps(Ops):
    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin
        self.attention = Attention()  # remembers which SDPA backend ran (attention.backends)

    def rmsnorm(self, x, w, eps):
        return rmsnorm_ref(x, w, eps)

    def linear(self, x, w):
        return x @ w.T  # the library's own kernel for this shape, in the weights' dtype

    def rope(self, x, step: Step):
        c, s = step.once("rope_rows", lambda: (self.cos[step.pos].float(), self.sin[step.pos].float()))
        return rope_rows_ref(x, c, s)

    def swiglu(self, gate, up):
        # silu rounded to the dtype, then the product (not swiglu_ref's single rounding): this path's numerics
        return F.silu(gate) * up

    def prefill_attention(self, q, kv, step: Step):
        """SDPA over the cache prefix (greta/engine/ops/sdpa.py: GQA by the kernel, no K/V copies, no mask
        tensor). q [T, H, D] -> [T, H, D]."""
        start, end = step.once("span", lambda: (int(step.pos[0]), int(step.pos[-1]) + 1))
        k, v = kv[0][None, :, :end], kv[1][None, :, :end]
        return self.attention(q.transpose(0, 1)[None], k, v, start)[0].transpose(0, 1)

    def decode_attention(self, q, kv, step: Step):
        """Plain softmax(q K^T / sqrt(D)) V for one query over keys 0..pos. q [1, H, D]."""
        _, H, D = q.shape
        end = int(step.pos[0]) + 1
        k, v = kv[0][:, :end], kv[1][:, :end]  # [Hkv, S, D]
        qg = q[0].view(k.shape[0], -1, D)  # [Hkv, G, D]
        s = (qg @ k.transpose(1, 2)).float() / math.sqrt(D)
        o = s.softmax(-1).to(v.dtype) @ v
        return o.reshape(1, H, D)
