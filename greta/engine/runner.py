"""Runs the decoder (model.forward) over a preallocated KV cache: prefill in chunks, decode one token, and
on CUDA with a backend that allows it (graphable in engine/backends.py: Triton kv_aligned=1, the kv_aligned=0 fast path),
the decode step captured once and replayed from a CUDA/HIP graph.

prefill(tokens, start): many positions at once, chunked so activations stay bounded.
decode(token, pos):     one position, reading everything before it from the KV cache.

The two kv_aligned modes (the probe's) are the choice of ops backend (greta/engine/ops):
  kv_aligned=0  the fastest op per path (cuBLAS matmuls and SDPA in prefill; M=1 matmuls and, on CUDA,
                flash-decoding in decode): the paths round differently, so drift is expected.
  kv_aligned=1  a row's arithmetic must not depend on how many rows run with it: the Triton kernels
                (batch-invariant by construction) or tiled torch (one fixed row tile, position-aligned KV
                blocks), so decode reproduces prefill bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch

from greta.engine.config import ModelConfig, cache_tokens, check_tree, inv_freq, kv_capacity
from greta.engine.model import forward
from greta.engine.ops import graphable, make_ops, with_control, with_tp, with_tree


class KVCache:
    """K and V for every layer: [n_layers, heads, capacity, head_dim], capacity a multiple of block; heads:
    the KV heads this process holds (all of cfg's, or a tensor-parallel rank's n_kv_heads / tp)."""

    def __init__(self, cfg: ModelConfig, tokens: int, block: int, dtype: torch.dtype, device,
                 heads: int | None = None):
        self.capacity = kv_capacity(tokens, block)
        shape = (cfg.n_layers, cfg.n_kv_heads if heads is None else heads, self.capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

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


class Runner:
    """A model (config + weights as a flat dict, HF names fused: wqkv, w13; see weights.py) ready to run:
    its KV cache, rope tables and ops backend. perturb installs a negative control (ops/controls.py).

    tp: this process's engine.tp.TPGroup (None: one device). Then weights are this rank's shard
    (engine.source.load_model(shard=...)), the cache holds its n_kv_heads / tp heads, and the ops are
    wrapped in TPOps, which sums the row-parallel products and gathers the logits: every rank must make the
    same calls, and every rank gets the full logits.

    tree_segments: S > 0 is the tp-invariant mode (docs/TP.md, kv_aligned=1): wo and w2 sum their K as the
    fixed tree of S segments (config.tree_segments(cfg) is the model's S), so tp = 1, 2, 4, 8 give the same
    bits where S allows them; 0 (the default) keeps the plain per-rank K order."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], *, max_tokens: int,
                 kv_aligned: bool, chunk: int, kv_block: int, perturb: str = "none", backend: str = "torch",
                 tp=None, tree_segments: int = 0):
        self.cfg, self.w, self.tp = cfg, weights, tp
        self.kv_aligned, self.chunk, self.kv_block, self.perturb = bool(kv_aligned), chunk, kv_block, perturb
        emb = weights["embed"]
        self.dtype, self.device = emb.dtype, emb.device
        heads = cfg.n_kv_heads // (tp.world if tp else 1)
        # room for a padded last tile, so aligned mode never writes past the end
        self.cache = KVCache(cfg, cache_tokens(max_tokens, chunk), kv_block, self.dtype, self.device, heads=heads)
        # one row past the cache: rope_offset's decode reads position pos + 1
        self.cos, self.sin = rope_tables(cfg, self.cache.capacity + 1, self.device, seq_len=max_tokens)
        ops = make_ops(backend, self.kv_aligned, self.cos, self.sin, chunk=chunk, kv_block=kv_block,
                       tp_invariant=bool(tree_segments))
        self.graphable = graphable(ops, self.device)
        self.tree_segments = tree_segments
        if tree_segments:
            if not self.kv_aligned:
                raise ValueError("the tp-invariant tree (tree_segments > 0) needs kv_aligned=1")
            check_tree(cfg, tree_segments, tp.world if tp else 1)
        if tp is not None:
            ops = with_tp(ops, tp, self.kv_aligned, max_numel=chunk * cfg.hidden_size, dtype=self.dtype,
                          device=self.device, segments=tree_segments // tp.world)
        elif tree_segments:
            ops = with_tree(ops, tree_segments)
        self.ops = with_control(ops, perturb)
        self._graph = None

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start: int = 0, keep: list[int] | None = None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Ingest tokens at positions start.. in chunks of self.chunk. Returns fp32 logits [len(keep), V]
        for the absolute positions in keep (default: the last one)."""
        return chunked_prefill(self._forward, tokens, start, keep, chunk=self.chunk, aligned=self.kv_aligned,
                               device=self.device, progress=progress)

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """One token at position pos; returns fp32 logits [V]."""
        if self.graphable:
            return self._decode_graphed(token, pos)
        return self._forward(token.reshape(1), torch.tensor([pos], device=self.device), [0], decode=True)[0]

    @torch.inference_mode()
    def teacher_forced(self, prompt: torch.Tensor, fed: list[torch.Tensor]) -> torch.Tensor:
        """kv_aligned=1: prefill logits at positions len(prompt).. for the tokens decode was fed there, after
        prefill(prompt) and those decode steps, from this runner's cache: positions before the last tile
        boundary are the first prefill's; from there ONE FULL tile is prefilled again (the rest of the prompt,
        the fed tokens, then filler tokens to the tile's end: causal, so later rows never reach earlier ones;
        in kv_aligned=1 no row depends on the others). A full tile, so every row-count-dependent choice (a
        reduction's algorithm under tensor parallelism) sees prefill's size, not a short last chunk's."""
        ctx, n, chunk = prompt.numel(), len(fed), self.chunk
        start = ctx - ctx % chunk
        if not self.kv_aligned or ctx + n > start + chunk:
            raise ValueError(f"teacher_forced needs kv_aligned=1 and the {n} fed positions inside the tile after ctx {ctx}")
        seq = torch.cat([prompt[start:], torch.stack(list(fed)).reshape(-1).to(prompt.dtype)])
        seq = torch.cat([seq, seq[-1:].repeat(chunk - seq.numel())])
        return self.prefill(seq, start=start, keep=list(range(ctx, ctx + n)))

    def _forward(self, tokens, pos, rows, decode: bool) -> torch.Tensor:
        return forward(self.ops, self.cfg, self.w, self.cache, self.ops.plan(tokens, pos, rows, decode))

    def _decode_graphed(self, token, pos: int) -> torch.Tensor:
        """The decode step replayed from a CUDA/HIP graph: no host sync inside the step. The first call runs
        the step eagerly (twice, same inputs, same cache writes) on a side stream, then captures it."""
        if self._graph is None:
            self._tok = token.reshape(1).to(self.device, torch.int64).clone()
            self._pos = torch.tensor([pos], device=self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(self._tok, self._pos, [0], decode=True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = self._forward(self._tok, self._pos, [0], decode=True)
            self._graph = graph
        self._tok.copy_(token.reshape(1))
        self._pos.fill_(pos)
        self._graph.replay()
        return self._out[0].clone()  # the next replay overwrites the graph's output buffer


def chunked_prefill(run: Callable, tokens: torch.Tensor, start: int, keep: list[int] | None, *, chunk: int,
                    aligned: bool, device, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The one prefill loop (Runner, and greta.engine.batch per sequence): tokens at positions start.. in
    chunks of `chunk`, each through run(tokens, pos, rows, decode=False) -> logits of rows. Returns fp32
    logits [len(keep), V] for the absolute positions in keep (default: the last one)."""
    n = tokens.numel()
    keep = [start + n - 1] if keep is None else keep
    out = {}
    if aligned and start % chunk:
        raise ValueError(f"aligned prefill must start on a tile boundary (start={start}, chunk={chunk})")
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        pos = torch.arange(start + c0, start + c1, device=device)
        rows = [p - (start + c0) for p in keep if start + c0 <= p < start + c1]
        logits = run(tokens[c0:c1], pos, rows, decode=False)
        for r, row in zip(rows, logits):
            out[start + c0 + r] = row
        if progress:
            progress(c1, n)
    return torch.stack([out[p] for p in keep])
