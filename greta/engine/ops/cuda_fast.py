"""kv_aligned=0 on CUDA: the fastest ops we have, exactness not asked for (the price-of-exactness baseline).

  linears     cuBLAS (x @ w.T), as TorchOps
  prefill     SDPA over the cache prefix, cuDNN / flash / efficient through sdpa.py (TorchOps')
  decode      flash-decoding (greta.kernels.flash_decode): split over the keys, no host sync
  elementwise the Triton RMSNorm, RoPE and SwiGLU kernels (one launch each, not torch's 3-7)

Nothing in a decode step reads a device value on the host (positions stay device tensors, the lm_head row
is a slice), so the runner captures the whole step in a CUDA graph (graphable in engine/backends.py) and replays it.
"""
from __future__ import annotations

from greta.engine.ops.base import Step
from greta.engine.ops.torch_ops import TorchOps


class CudaFastOps(TorchOps):
    def __init__(self, cos, sin):
        super().__init__(cos, sin)
        from greta import kernels  # the Triton kernels (top-level kernels/ folder)

        self.k = kernels

    def rmsnorm(self, x, w, eps):
        return self.k.rmsnorm(x, w, eps)

    def add_rmsnorm(self, x, d, w, eps):
        return self.k.add_rmsnorm(d, x, w, eps)  # rounds fp32(d) + fp32(x) to x.dtype, as x + d does

    def rope(self, x, step: Step):
        return self.k.rope(x, self.cos, self.sin, step.pos)

    def swiglu(self, gate, up):
        return self.k.swiglu(gate, up)

    def decode_attention(self, q, kv, step: Step):
        return self.k.flash_decode(q, kv[0], kv[1], step.pos)

    def lm_head(self, x, norm, head, eps, step: Step):
        x = x[0:1] if step.decode else x[list(step.rows)]  # decode: a view, no host-built index in the graph
        return self.linear(self.rmsnorm(x, norm, eps), head).float()
