"""kv_aligned=1 in plain torch: a row's arithmetic must not depend on how many rows run with it.

Every op runs on one fixed row tile of `chunk` rows: a decode step pads its one row into the tile, at row
pos % chunk, where prefill would have put it. Attention walks the cache in fixed blocks of `kv_block` keys
aligned to absolute positions, block 0 first, with an fp32 online softmax. Each row then sees the same
shapes and kernels in both paths, so decode reproduces prefill bit for bit as long as the library picks
kernels by shape (which is what the probe measures). The price: a decode step computes a whole tile.
"""
from __future__ import annotations

import math

import torch

from greta.engine.ops.base import Step
from greta.engine.ops.torch_ops import TorchOps
from greta.kernels.reference import tree_sum_ref


LANES = 64      # the widest SIMD body of torch's CPU elementwise loops: two 512-bit vectors of bf16
SERIAL = 16384  # elements per piece: below at::parallel_for's grain (32768), so one thread runs a piece


def by_whole_vectors(fn, x: torch.Tensor) -> torch.Tensor:
    """fn (elementwise) of x, computed on flat pieces of x padded to whole vectors (module docstring); on a
    GPU, where every element runs the same code, fn(x)."""
    if not x.is_cpu:
        return fn(x)
    flat = x.reshape(-1)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % LANES))
    return torch.cat([fn(piece) for piece in padded.split(SERIAL)])[:n].view(x.shape)


class TiledTorchOps(TorchOps):
    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, chunk: int, kv_block: int, whole_vectors: bool = False):
        super().__init__(cos, sin)
        self.chunk, self.kv_block, self.whole_vectors = chunk, kv_block, whole_vectors

    @classmethod
    def build(cls, cos, sin, *, chunk, kv_block, tp_invariant=False):
        return cls(cos, sin, chunk, kv_block, whole_vectors=tp_invariant)

    def swiglu(self, gate, up):
        if self.whole_vectors:
            return by_whole_vectors(torch.nn.functional.silu, gate) * up
        return super().swiglu(gate, up)

    def _exp(self, x):
        return by_whole_vectors(torch.exp, x) if self.whole_vectors else torch.exp(x)

    def plan(self, tokens, pos, rows, decode) -> Step:
        """Pad to one full tile; the valid rows sit where prefill would put them, filler rows are copies of
        the first row (same token and position) and are never written to the cache."""
        t = self.chunk
        base = int(pos[0]) - int(pos[0]) % t
        offs = (pos - base).tolist()
        if offs[-1] >= t:
            raise ValueError("a call may not cross a tile boundary in aligned mode")
        tile_tok = tokens[:1].repeat(t)
        tile_pos = pos[:1].repeat(t)
        idx = torch.tensor(offs, device=pos.device)
        tile_tok[idx] = tokens
        tile_pos[idx] = pos
        return Step(tile_tok, tile_pos, decode, [offs[r] for r in rows], kv_rows=idx)

    def tree_linear(self, x, w, segments, dtype):
        """Each segment's partial by one fp32 matmul of contiguous copies: the same shapes, strides and so the
        same kernel (and K order) whichever rank holds the segment; then the tree, rounded once."""
        seg = w.shape[1] // segments
        parts = [x[:, s * seg:(s + 1) * seg].float().contiguous() @ w[:, s * seg:(s + 1) * seg].float().contiguous().T
                 for s in range(segments)]
        return tree_sum_ref(parts, dtype)

    def prefill_attention(self, q, kv, step: Step):
        return self._blocked_attention(q, kv, step.pos)

    def decode_attention(self, q, kv, step: Step):
        return self._blocked_attention(q, kv, step.pos)

    def lm_head(self, x, norm, head, eps, step: Step):
        """The whole tile (so the shapes stay fixed), then step.rows."""
        logits = self.linear(self.rmsnorm(x, norm, eps), head).float()
        return logits[step.rows]

    def _blocked_attention(self, q, kv, pos):
        """Online softmax over fixed, position-aligned KV blocks, block 0 first. q [T, H, D], T = one tile;
        row t sees keys 0..pos[t]."""
        B, (kc, vc) = self.kv_block, kv
        T, H, D = q.shape
        Hkv = kc.shape[0]
        G = H // Hkv
        qg = q.view(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * T, D).float()  # rows: (g, t)
        qpos = pos.repeat(G)  # [G*T], matching the (g, t) row order
        end = int(qpos.max()) + 1
        m = torch.full((Hkv, G * T), -math.inf, device=q.device)
        l = torch.zeros((Hkv, G * T), device=q.device)
        acc = torch.zeros((Hkv, G * T, D), device=q.device)
        scale = 1.0 / math.sqrt(D)
        for b0 in range(0, end, B):
            kb = kc[:, b0:b0 + B].float()  # [Hkv, B, D]
            vb = vc[:, b0:b0 + B].float()
            s = (qg @ kb.transpose(1, 2)) * scale
            kpos = torch.arange(b0, b0 + B, device=q.device)
            s = s.masked_fill(kpos[None, None, :] > qpos[None, :, None], -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = self._exp(m - m_new)
            p = self._exp(s - m_new[..., None])
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vb
            m = m_new
        o = (acc / l[..., None]).to(q.dtype)  # [Hkv, G*T, D]
        return o.view(Hkv, G, T, D).permute(2, 0, 1, 3).reshape(T, H, D)
