"""kv_aligned=1 on the Triton kernels of kernels/ (greta.kernels). They are batch-invariant by themselves
(fixed reduction tiles, query tiles aligned to absolute positions), so a decode step runs its one row,
with no padding. Nothing here syncs with the host inside a decode step, so the runner can capture it in a
CUDA graph (positions stay device tensors; the decode row is sliced, not gathered by a host list)."""
from __future__ import annotations

from greta.engine.ops.base import Ops, Step


class TritonOps(Ops):
    @classmethod
    def build(cls, cos, sin, *, chunk, kv_block, tp_invariant=False):
        return cls(cos, sin, kv_block)

    def __init__(self, cos, sin, kv_block: int):
        from greta import kernels  # the Triton kernels (top-level kernels/ folder)

        if kv_block % kernels.BLOCK_KV:
            raise ValueError(f"kv_block={kv_block} must be a multiple of the kernels' BLOCK_KV={kernels.BLOCK_KV}")
        self.k, self.cos, self.sin = kernels, cos, sin

    def rmsnorm(self, x, w, eps):
        return self.k.rmsnorm(x, w, eps)

    def add_rmsnorm(self, x, d, w, eps):
        return self.k.add_rmsnorm(d, x, w, eps)  # rounds fp32(d) + fp32(x) to x.dtype, as x + d does

    def linear(self, x, w):
        return self.k.matmul(x, w)

    def tree_linear(self, x, w, segments, dtype):
        return self.k.matmul_tree(x, w, segments, out_dtype=dtype)  # the tree inside one kernel, rounded at the store

    def rope(self, x, step: Step):
        return self.k.rope(x, self.cos, self.sin, step.pos)

    def swiglu(self, gate, up):
        return self.k.swiglu(gate, up)

    def prefill_attention(self, q, kv, step: Step):
        # the chunk's first position: read back to the host once per step (the grid needs it), and handed to
        # the kernel as a view of the positions already on the device (no copy per layer: bench/profile_prefill.py)
        start = step.once("start", lambda: int(step.pos[0]))
        return self.k.prefill_attention(q, kv[0], kv[1], start, start_t=step.pos[:1])

    def decode_attention(self, q, kv, step: Step):
        return self.k.decode_attention(q, kv[0], kv[1], step.pos)

    def lm_head(self, x, norm, head, eps, step: Step):
        x = x[0:1] if step.decode else x[list(step.rows)]  # decode: a view, no host-built index in the graph
        return self.k.matmul(self.k.rmsnorm(x, norm, eps), head).float()
