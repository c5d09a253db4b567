"""The one KV cache: a slab of positions per sequence, preallocated.

    cache = KVCache(cfg, n_seqs=3, tokens=ctx + gen + chunk, block=1024, dtype=torch.bfloat16, device="cuda")
    cache.layer(i)        # (k, v) [n_seqs, Hkv, capacity, D]: what a batch decode step reads and writes
    cache.sequence(b)     # sequence b's slab as a single-sequence cache: layer(i) -> (k, v) [Hkv, capacity, D]

A single sequence is a batch of one slab: the runner's prefill and its one-sequence decode run the model over
cache.sequence(b), a batch decode step over the whole cache. Each slab's (k, v) of a layer is a contiguous
view, the layout the single-sequence backends take, so a sequence's arithmetic is the same in a cache of one
slab or of many.
"""
from __future__ import annotations

import torch

from greta.engine.config import ModelConfig, kv_capacity


class SlabView:
    """One sequence's slab as a single-sequence cache: layer(i) -> (k, v) [Hkv, capacity, D], contiguous."""

    def __init__(self, cache: "KVCache", b: int):
        self.cache, self.b = cache, b
        self.capacity = cache.capacity

    def layer(self, i: int):
        return self.cache.k[i, self.b], self.cache.v[i, self.b]


class KVCache:
    """K and V of n_seqs sequences: [n_layers, n_seqs, heads, capacity, head_dim], capacity `tokens` rounded up
    to whole blocks (config.kv_capacity; config.kv_bytes is its size); heads: the KV heads this process holds (all of cfg's, or a tensor-parallel rank's
    n_kv_heads / tp)."""

    def __init__(self, cfg: ModelConfig, n_seqs: int, tokens: int, block: int, dtype: torch.dtype, device,
                 heads: int | None = None):
        if n_seqs < 1:
            raise ValueError(f"a KV cache holds at least one sequence, got n_seqs={n_seqs}")
        self.n_seqs, self.capacity = n_seqs, kv_capacity(tokens, block)
        shape = (cfg.n_layers, n_seqs, cfg.n_kv_heads if heads is None else heads, self.capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def sequence(self, b: int) -> SlabView:
        if not 0 <= b < self.n_seqs:
            raise IndexError(f"sequence {b} is not in a cache of {self.n_seqs}")
        return SlabView(self, b)

    def reset(self, b: int | None = None):
        """Zero every slab, or sequence b's."""
        for t in (self.k, self.v):
            (t if b is None else t[:, b]).zero_()

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
