"""The kv_aligned=0 fast path in plain torch: the fastest op per path, so prefill and decode round
differently (the drift the probe is there to see).

prefill: full-chunk matmuls and SDPA over the cache prefix; decode: M=1 matmuls and a plain
softmax(q K^T) V for the one query. RMSNorm and RoPE are the kernels' torch references (greta.kernels
reference.py, importable without triton): the same bits as the formulas this path always used, kept in one
place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from greta.engine.ops.base import Ops, Step
from greta.kernels.reference import rmsnorm_ref, rope_rows_ref


class TorchOps(Ops):
    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin

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
        """SDPA over the cache prefix. q [T, H, D] -> [T, H, D]. K/V are expanded to all heads so SDPA can
        pick a fused kernel that takes a mask (flash takes none; GQA narrows the choice further)."""
        pos = step.pos
        end = int(pos[-1]) + 1
        g = q.shape[1] // kv[0].shape[0]
        k = kv[0][:, :end].repeat_interleave(g, dim=0)
        v = kv[1][:, :end].repeat_interleave(g, dim=0)
        mask = torch.arange(end, device=q.device)[None, :] <= pos[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask)
        return o[0].transpose(0, 1)

    def decode_attention(self, q, kv, step: Step):
        """Plain softmax(q K^T / sqrt(D)) V for one query over keys 0..pos. q [1, H, D]."""
        _, H, D = q.shape
        end = int(step.pos[0]) + 1
        k, v = kv[0][:, :end], kv[1][:, :end]  # [Hkv, S, D]
        qg = q[0].view(k.shape[0], -1, D)  # [Hkv, G, D]
        s = (qg @ k.transpose(1, 2)).float() / math.sqrt(D)
        o = s.softmax(-1).to(v.dtype) @ v
        return o.reshape(1, H, D)
