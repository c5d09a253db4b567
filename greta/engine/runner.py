"""The one runner: the decoder (model.forward) over a preallocated KV cache of one slab per sequence
(greta/engine/kvcache.py; a single sequence is a batch of one slab). Prefill in chunks, decode one token, and a
batch decode step of one row per live sequence; on CUDA with a backend that allows it (graphable in
engine/backends.py: Triton kv_aligned=1, the kv_aligned=0 fast path), each decode step shape is captured once and
replayed from a CUDA/HIP graph (greta/engine/graphs.py).

prefill(tokens, start, seq=b):            many positions of sequence b at once, chunked so activations stay bounded.
decode(token, pos):                       one position of sequence 0, reading everything before it from its slab.
decode_batch(tokens, positions, seqs):    one position of each sequence named, in ONE step (greta/engine/ops/batch.py).

The two kv_aligned modes (the probe's) are the choice of ops backend (greta/engine/ops):
  kv_aligned=0  the fastest op per path (cuBLAS matmuls and SDPA in prefill; M=1 matmuls and, on CUDA,
                flash-decoding in decode): the paths round differently, so drift is expected.
  kv_aligned=1  a row's arithmetic must not depend on how many rows run with it: the Triton kernels
                (batch-invariant by construction) or tiled torch (one fixed row tile, position-aligned KV
                blocks), so decode reproduces prefill bit for bit, alone or in a batch.

The three ways of computing a request's logits (alone, in the batch, its teacher-forced reference) and the one
greedy loop are greta/engine/requests.py.
"""
from __future__ import annotations

from typing import Callable

import torch

from greta.engine.config import ModelConfig, cache_tokens, check_tree, inv_freq
from greta.engine.graphs import StepGraphs
from greta.engine.kvcache import KVCache
from greta.engine.model import forward
from greta.engine.ops import batch_ops, graphable, make_ops, tp_reduce, with_control, with_tp, with_tree


def rope_tables(cfg: ModelConfig, n: int, device, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim/2] in fp32 (angles computed in fp64). seq_len: the run's length, which only
    dynamic (NTK) rope scaling depends on; Greta fixes it for the run (prefill and decode alike), as
    transformers does for one forward pass over seq_len tokens."""
    inv = torch.tensor(inv_freq(cfg, seq_len), dtype=torch.float64)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    return ang.cos().float().to(device), ang.sin().float().to(device)


class Runner:
    """A model (config + weights as a flat dict, HF names fused: wqkv, w13; see weights.py) ready to run:
    its KV cache of n_seqs slabs (max_tokens positions each, plus a chunk of headroom), rope tables and ops
    backend, and that backend's batch wrapper for batch decode steps. perturb installs a negative control
    (ops/controls.py) over both.

    tp: this process's engine.tp.TPGroup (None: one device). Then weights are this rank's shard
    (engine.source.load_model(shard=...)), the cache holds its n_kv_heads / tp heads, and the ops (batch ones
    too) are wrapped in TPOps, which sums the row-parallel products and gathers the logits: every rank must make
    the same calls, and every rank gets the full logits.

    tree_segments: S > 0 is the tp-invariant mode (docs/TP.md, kv_aligned=1): wo and w2 sum their K as the
    fixed tree of S segments (config.tree_segments(cfg) is the model's S), so tp = 1, 2, 4, 8 give the same
    bits where S allows them; 0 (the default) keeps the plain per-rank K order. Batch steps do not take it."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], *, max_tokens: int,
                 kv_aligned: bool, chunk: int, kv_block: int, perturb: str = "none", backend: str = "torch",
                 tp=None, tree_segments: int = 0, n_seqs: int = 1):
        self.cfg, self.w, self.tp = cfg, weights, tp
        self.kv_aligned, self.chunk, self.kv_block, self.perturb = bool(kv_aligned), chunk, kv_block, perturb
        emb = weights["embed"]
        self.dtype, self.device = emb.dtype, emb.device
        heads = cfg.n_kv_heads // (tp.world if tp else 1)
        # room for a padded last tile, so aligned mode never writes past the end
        self.cache = KVCache(cfg, n_seqs, cache_tokens(max_tokens, chunk), kv_block, self.dtype, self.device,
                             heads=heads)
        # one row past the cache: rope_offset's decode reads position pos + 1
        self.cos, self.sin = rope_tables(cfg, self.cache.capacity + 1, self.device, seq_len=max_tokens)
        inner = make_ops(backend, self.kv_aligned, self.cos, self.sin, chunk=chunk, kv_block=kv_block,
                         tp_invariant=bool(tree_segments))
        self.graphable = graphable(inner, self.device)
        self.tree_segments = tree_segments
        self.ops, self.batch_ops = self._wrap(inner, tree_segments)
        self._graphs = StepGraphs()

    def _wrap(self, inner, tree_segments: int):
        """(the ops, the batch decode step's ops): the backend, then its batch wrapper (for batch steps), then
        TP's collectives (one reduction shared by both) or the single-device tree, then the control."""
        tp, batch = self.tp, batch_ops(inner)
        if tree_segments:
            if not self.kv_aligned:
                raise ValueError("the tp-invariant tree (tree_segments > 0) needs kv_aligned=1")
            check_tree(self.cfg, tree_segments, tp.world if tp else 1)
        if tp is not None:
            reduce = tp_reduce(tp, self.kv_aligned, tree_segments, max_numel=self.chunk * self.cfg.hidden_size,
                               dtype=self.dtype, device=self.device)
            inner = with_tp(inner, tp, reduce, segments=tree_segments // tp.world)
            batch = with_tp(batch, tp, reduce)
        elif tree_segments:
            inner = with_tree(inner, tree_segments)
        return with_control(inner, self.perturb), with_control(batch, self.perturb)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start: int = 0, keep: list[int] | None = None,
                progress: Callable[[int, int], None] | None = None, seq: int = 0) -> torch.Tensor:
        """Ingest sequence seq's tokens at positions start.. in chunks of self.chunk into its slab. Returns fp32
        logits [len(keep), V] for the absolute positions in keep (default: the last one)."""
        view = self.cache.sequence(seq)

        def run(tok, pos, rows, decode):
            return forward(self.ops, self.cfg, self.w, view, self.ops.plan(tok, pos, rows, decode))

        return chunked_prefill(run, tokens, start, keep, chunk=self.chunk, aligned=self.kv_aligned,
                               device=self.device, progress=progress)

    @torch.inference_mode()
    def decode(self, token, pos: int) -> torch.Tensor:
        """One token (an int or a tensor) of sequence 0 at position pos, through the backend's single-sequence
        decode; returns fp32 logits [V]."""
        tok = torch.as_tensor(token, device=self.device).reshape(1).to(torch.int64)
        pos_t = torch.tensor([pos], device=self.device)
        if self.graphable:
            return self._graphs.run("one", self._one_step, (tok, pos_t))[0]
        return self._one_step(tok, pos_t)[0]

    def _one_step(self, tok, pos) -> torch.Tensor:
        step = self.ops.plan(tok, pos, [0], True)
        return forward(self.ops, self.cfg, self.w, self.cache.sequence(0), step)

    @torch.inference_mode()
    def decode_batch(self, tokens, positions, seqs) -> torch.Tensor:
        """One batch decode step: row r is token tokens[r] of sequence seqs[r] at position positions[r] (each
        sequence at most once). Returns fp32 logits [rows, V] in the rows' order."""
        if self.tree_segments:
            raise ValueError("batch decode steps do not take the tp-invariant tree (tree_segments > 0)")
        host_pos, host_seq = _ints(positions), _ints(seqs)
        tok = torch.as_tensor(tokens, device=self.device).reshape(-1).to(torch.int64)
        if not tok.numel() == len(host_pos) == len(host_seq) or len(set(host_seq)) != len(host_seq):
            raise ValueError("decode takes one token and one position per sequence, each sequence at most once")
        if min(host_seq) < 0 or max(host_seq) >= self.cache.n_seqs:
            raise IndexError(f"decode names a sequence outside the batch of {self.cache.n_seqs}")
        pos = torch.tensor(host_pos, device=self.device)
        seq = torch.tensor(host_seq, device=self.device)
        if self.graphable:
            return self._graphs.run(("batch", tok.numel()), self._batch_step, (tok, pos, seq))
        return self._batch_step(tok, pos, seq, host_layout(host_pos, host_seq))

    def _batch_step(self, tok, pos, seq, layout: dict | None = None) -> torch.Tensor:
        """One batch step's forward. layout: what an eager step's ops would otherwise read back (host_layout); None
        for a step to be captured, which must read nothing back (a captured layout would be the first step's)."""
        step = self.batch_ops.plan_batch(tok, pos, seq)
        if layout and getattr(self.batch_ops, "rows_as_given", False):  # the step's rows are the rows given
            for key, value in layout.items():
                step.once(key, lambda value=value: value)
        return forward(self.batch_ops, self.cfg, self.w, self.cache, step)

    @torch.inference_mode()
    def teacher_forced(self, prompt: torch.Tensor, fed: list[torch.Tensor]) -> torch.Tensor:
        """kv_aligned=1: prefill logits at positions len(prompt).. for the tokens decode was fed there, after
        prefill(prompt) and those decode steps, from sequence 0's slab: positions before the last tile
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


def host_layout(pos: list[int], seq: list[int]) -> dict:
    """What the eager batch ops (ops/batch.py BatchOps, TorchBatchOps) would otherwise read back from the
    device: each sequence's rows, and how far attention reads (the furthest position + 1). The graphable
    ones read neither: their attention takes the sequence ids and positions as device tensors."""
    return {"seq_groups": [(b, [r]) for r, b in enumerate(seq)], "kv_end": max(pos) + 1}


def _ints(values) -> list[int]:
    """Host integers from a list, or a tensor read back once."""
    values = values.tolist() if isinstance(values, torch.Tensor) else values
    return [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]


def chunked_prefill(run: Callable, tokens: torch.Tensor, start: int, keep: list[int] | None, *, chunk: int,
                    aligned: bool, device, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The one prefill loop (Runner.prefill): tokens at positions start.. in
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
