"""Llama-family decoder with a preallocated KV cache and two genuinely different paths.

prefill(tokens, start): many positions at once, chunked so activations stay bounded.
decode(token, pos):     one position, reading everything before it from the KV cache.

Two attention/matmul modes (the probe's kv_aligned):
  kv_aligned=0  fastest torch ops per path: SDPA and full-chunk matmuls in prefill, M=1 matmuls and a
                plain softmax(q K^T) V in decode. The paths round differently, so drift is expected.
  kv_aligned=1  a row's arithmetic must not depend on how many rows run with it. Two backends:
                triton: the batch-invariant kernels of kernels/ (greta.kernels), whose reduction order is
                  fixed per row by construction; the decode step is replayed from a CUDA/HIP graph.
                torch: every op runs on one fixed row tile of `chunk` rows (decode pads its one row into
                  that tile, at row pos % chunk), and attention walks the cache in fixed blocks of
                  `kv_block` keys aligned to absolute positions, from block 0 upward with the same online
                  softmax. Each row then sees the same shapes and kernels in both paths, so decode
                  reproduces prefill bit for bit as long as the library picks kernels by shape (which is
                  what the probe measures). The price: a decode step computes a whole tile.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from greta.engine.config import ModelConfig, inv_freq, kv_capacity

PERTURBATIONS = ("none", "rope_offset", "kv_off_by_one")


class KVCache:
    """K and V for every layer: [n_layers, n_kv_heads, capacity, head_dim], capacity a multiple of block."""

    def __init__(self, cfg: ModelConfig, tokens: int, block: int, dtype: torch.dtype, device):
        self.capacity = kv_capacity(tokens, block)
        shape = (cfg.n_layers, cfg.n_kv_heads, self.capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def reset(self):
        self.k.zero_()
        self.v.zero_()

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def rope_tables(cfg: ModelConfig, n: int, device, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim/2] in fp32 (angles computed in fp64). seq_len: the run's length, which only
    dynamic (NTK) rope scaling depends on; Greta fixes it for the run (prefill and decode alike), as
    transformers does for one forward pass over seq_len tokens."""
    inv = torch.tensor(inv_freq(cfg, seq_len), dtype=torch.float64)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate_half convention. x [T, H, D]; cos/sin [T, D/2]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class Llama:
    """Weights as a flat dict (HF names fused: wqkv, w13). See weights.py for how they're made or loaded."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], *, max_tokens: int,
                 kv_aligned: bool, chunk: int, kv_block: int, perturb: str = "none", backend: str = "torch"):
        if perturb not in PERTURBATIONS:
            raise ValueError(f"perturb must be one of {PERTURBATIONS}, got {perturb!r}")
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be torch or triton, got {backend!r}")
        self.kernels = None
        if backend == "triton" and kv_aligned:
            from greta import kernels  # the Triton kernels (top-level kernels/ folder)

            if kv_block % kernels.BLOCK_KV:
                raise ValueError(f"kv_block={kv_block} must be a multiple of the kernels' BLOCK_KV={kernels.BLOCK_KV}")
            self.kernels = kernels
        self._graph = None
        self.cfg, self.w = cfg, weights
        self.kv_aligned, self.chunk, self.kv_block, self.perturb = bool(kv_aligned), chunk, kv_block, perturb
        emb = weights["embed"]
        self.dtype, self.device = emb.dtype, emb.device
        # room for a padded last tile, so aligned mode never writes past the end
        self.cache = KVCache(cfg, max_tokens + chunk, kv_block, self.dtype, self.device)
        self.cos, self.sin = rope_tables(cfg, self.cache.capacity + 1, self.device, seq_len=max_tokens)

    # --- public paths ----------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start: int = 0, keep: list[int] | None = None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Ingest tokens at positions start.. in chunks of self.chunk. Returns fp32 logits [len(keep), V]
        for the absolute positions in keep (default: the last one)."""
        n = tokens.numel()
        keep = [start + n - 1] if keep is None else keep
        out = {}
        if self.kv_aligned and start % self.chunk:
            raise ValueError(f"aligned prefill must start on a tile boundary (start={start}, chunk={self.chunk})")
        for c0 in range(0, n, self.chunk):
            c1 = min(n, c0 + self.chunk)
            pos = torch.arange(start + c0, start + c1, device=self.device)
            rows = [p - (start + c0) for p in keep if start + c0 <= p < start + c1]
            logits = self._forward(tokens[c0:c1], pos, rows, decode=False)
            for r, row in zip(rows, logits):
                out[start + c0 + r] = row
            if progress:
                progress(c1, n)
        return torch.stack([out[p] for p in keep])

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """One token at position pos; returns fp32 logits [V]."""
        if self.kernels is not None and self.device.type == "cuda":
            return self._decode_graphed(token, pos)
        return self._forward(token.reshape(1), torch.tensor([pos], device=self.device), [0], decode=True)[0]

    def _decode_graphed(self, token, pos: int) -> torch.Tensor:
        """The Triton decode step replayed from a CUDA/HIP graph: no host sync inside the step.
        The first call runs the step eagerly (twice, same inputs, same cache writes), then captures it."""
        if self._graph is None:
            self._tok = token.reshape(1).to(self.device, torch.int64).clone()
            self._pos = torch.tensor([pos], device=self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward_kernels(self._tok, self._pos, decode=True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = self._forward_kernels(self._tok, self._pos, decode=True)
            self._graph = graph
        self._tok.copy_(token.reshape(1))
        self._pos.fill_(pos)
        self._graph.replay()
        return self._out[0].clone()  # the next replay overwrites the graph's output buffer

    # --- the decoder -----------------------------------------------------------
    def _forward(self, tokens, pos, rows, decode: bool) -> torch.Tensor:
        if self.kernels is not None:
            return self._forward_kernels(tokens, pos, decode, rows)
        cfg, w = self.cfg, self.w
        n_valid = tokens.numel()
        if self.kv_aligned:  # pad to one full tile; the valid rows sit where prefill would put them
            tokens, pos, rows, place = self._pad_to_tile(tokens, pos, rows)
        else:
            place = slice(0, n_valid)
        rope_pos = pos + 1 if (decode and self.perturb == "rope_offset") else pos
        cos, sin = self.cos[rope_pos], self.sin[rope_pos]
        x = w["embed"][tokens]
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        for i in range(cfg.n_layers):
            h = rmsnorm(x, w[f"{i}.attn_norm"], cfg.rms_eps)
            qkv = h @ w[f"{i}.wqkv"].T
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = apply_rope(q.view(-1, H, D), cos, sin)
            k = apply_rope(k.view(-1, Hkv, D), cos, sin)
            v = v.view(-1, Hkv, D)
            vp = pos[place]
            self.cache.k[i][:, vp] = k[place].transpose(0, 1)
            self.cache.v[i][:, vp] = v[place].transpose(0, 1)
            if self.kv_aligned:
                a = self._attn_aligned(i, q, pos, decode)
            elif decode:
                a = self._attn_decode(i, q, int(pos[0]))
            else:
                a = self._attn_prefill(i, q, pos)
            x = x + a.reshape(-1, H * D) @ w[f"{i}.wo"].T
            h = rmsnorm(x, w[f"{i}.mlp_norm"], cfg.rms_eps)
            g, u = (h @ w[f"{i}.w13"].T).chunk(2, dim=-1)
            x = x + (F.silu(g) * u) @ w[f"{i}.w2"].T
        if not self.kv_aligned:
            x = x[rows]
        x = rmsnorm(x, w["norm"], cfg.rms_eps)
        logits = (x @ w["lm_head"].T).float()
        return logits[rows] if self.kv_aligned else logits

    def _forward_kernels(self, tokens, pos, decode: bool, rows=(0,)) -> torch.Tensor:
        """kv_aligned=1 on the Triton kernels. They are batch-invariant by themselves (fixed tiles, query
        tiles aligned to absolute positions), so a decode step runs on its one row, with no padding."""
        cfg, w, K = self.cfg, self.w, self.kernels
        T = tokens.numel()
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        rope_pos = pos + 1 if (decode and self.perturb == "rope_offset") else pos
        attn_pos = pos - 1 if (decode and self.perturb == "kv_off_by_one") else pos
        x = w["embed"][tokens]
        for i in range(cfg.n_layers):
            h = K.rmsnorm(x, w[f"{i}.attn_norm"], cfg.rms_eps)
            qkv = K.matmul(h, w[f"{i}.wqkv"])
            q = K.rope(qkv[:, : H * D].view(T, H, D), self.cos, self.sin, rope_pos)
            k = K.rope(qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D), self.cos, self.sin, rope_pos)
            v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
            self.cache.k[i][:, pos] = k.transpose(0, 1)
            self.cache.v[i][:, pos] = v.transpose(0, 1)
            if decode:
                a = K.decode_attention(q, self.cache.k[i], self.cache.v[i], attn_pos)
            else:
                a = K.prefill_attention(q, self.cache.k[i], self.cache.v[i], int(pos[0]))
            x = x + K.matmul(a.reshape(T, H * D), w[f"{i}.wo"])
            h = K.rmsnorm(x, w[f"{i}.mlp_norm"], cfg.rms_eps)
            gu = K.matmul(h, w[f"{i}.w13"])
            x = x + K.matmul(K.swiglu(gu[:, : cfg.intermediate_size], gu[:, cfg.intermediate_size:]), w[f"{i}.w2"])
        x = x[0:1] if decode else x[list(rows)]
        return K.matmul(K.rmsnorm(x, w["norm"], cfg.rms_eps), w["lm_head"]).float()

    def _pad_to_tile(self, tokens, pos, rows):
        t = self.chunk
        base = int(pos[0]) - int(pos[0]) % t
        offs = (pos - base).tolist()
        if offs[-1] >= t:
            raise ValueError("a call may not cross a tile boundary in aligned mode")
        tile_tok = tokens[:1].repeat(t)  # filler rows: a copy of the first row, never written to the cache
        tile_pos = pos[:1].repeat(t)
        idx = torch.tensor(offs, device=self.device)
        tile_tok[idx] = tokens
        tile_pos[idx] = pos
        return tile_tok, tile_pos, [offs[r] for r in rows], idx

    def _kv_end(self, pos_last: int, decode: bool) -> int:
        """One past the last key a query at pos_last may see (the negative control drops the newest key)."""
        return pos_last if (decode and self.perturb == "kv_off_by_one") else pos_last + 1

    def _attn_prefill(self, i, q, pos):
        """SDPA over the cache prefix. q [T, H, D] -> [T, H, D]. K/V are expanded to all heads so SDPA can
        pick a fused kernel that takes a mask (flash takes none; GQA narrows the choice further)."""
        end = int(pos[-1]) + 1
        g = self.cfg.n_heads // self.cfg.n_kv_heads
        k = self.cache.k[i][:, :end].repeat_interleave(g, dim=0)
        v = self.cache.v[i][:, :end].repeat_interleave(g, dim=0)
        mask = torch.arange(end, device=self.device)[None, :] <= pos[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask)
        return o[0].transpose(0, 1)

    def _attn_decode(self, i, q, pos):
        """Plain softmax(q K^T / sqrt(D)) V for one query. q [1, H, D]."""
        cfg = self.cfg
        end = self._kv_end(pos, True)
        k, v = self.cache.k[i][:, :end], self.cache.v[i][:, :end]  # [Hkv, S, D]
        qg = q[0].view(cfg.n_kv_heads, -1, cfg.head_dim)  # [Hkv, G, D]
        s = (qg @ k.transpose(1, 2)).float() / math.sqrt(cfg.head_dim)
        o = s.softmax(-1).to(v.dtype) @ v
        return o.reshape(1, cfg.n_heads, cfg.head_dim)

    def _attn_aligned(self, i, q, pos, decode):
        """Online softmax over fixed, position-aligned KV blocks, block 0 first. q [T, H, D], T = one tile."""
        cfg, B = self.cfg, self.kv_block
        T, Hkv, D = q.shape[0], cfg.n_kv_heads, cfg.head_dim
        G = cfg.n_heads // Hkv
        qg = q.view(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * T, D).float()  # rows: (g, t)
        qpos = pos.repeat(G)  # [G*T], matching the (g, t) row order
        if decode and self.perturb == "kv_off_by_one":
            qpos = qpos - 1
        end = int(qpos.max()) + 1
        m = torch.full((Hkv, G * T), -math.inf, device=self.device)
        l = torch.zeros((Hkv, G * T), device=self.device)
        acc = torch.zeros((Hkv, G * T, D), device=self.device)
        scale = 1.0 / math.sqrt(D)
        for b0 in range(0, end, B):
            kb = self.cache.k[i][:, b0:b0 + B].float()  # [Hkv, B, D]
            vb = self.cache.v[i][:, b0:b0 + B].float()
            s = (qg @ kb.transpose(1, 2)) * scale
            kpos = torch.arange(b0, b0 + B, device=self.device)
            s = s.masked_fill(kpos[None, None, :] > qpos[None, :, None], -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new[..., None])
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vb
            m = m_new
        o = (acc / l[..., None]).to(q.dtype)  # [Hkv, G*T, D]
        return o.view(Hkv, G, T, D).permute(2, 0, 1, 3).reshape(T, cfg.n_heads, D)
