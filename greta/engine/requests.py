"""Several sequences decoded together over preallocated per-sequence KV slabs.

    br = BatchRunner(cfg, w, n_seqs=3, max_tokens=ctx + gen, kv_aligned=1, chunk=256, kv_block=1024)
    first = [br.prefill(b, prompts[b])[0] for b in range(3)]   # sequence by sequence, chunked
    logits = br.decode(tokens, positions, seqs)               # ONE step: a row per live sequence

Prefill runs sequence by sequence (chunks of one sequence) through the single-sequence path of the backend
(greta.engine.runner.chunked_prefill over that sequence's slab), so it is a plain Runner's prefill, bit for
bit. A decode step runs one row per live sequence through greta/engine/ops/batch.py: the row-wise ops once
over all rows (one linear of M = rows; the tiled torch backend lays rows into its fixed tiles), attention per
sequence over its own slab. A sequence that has finished is simply left out of the next step. With
kv_aligned=1 every backend is batch-invariant, so a request's logits are the same alone, in any batch, and in
its teacher-forced prefill reference; with kv_aligned=0 they drift (measured by the batch probe).
"""
from __future__ import annotations

from typing import Callable

import torch

from greta.engine.config import ModelConfig, cache_tokens, kv_capacity
from greta.engine.model import forward
from greta.engine.ops import graphable, make_ops, with_control
from greta.engine.ops.batch import batch_ops
from greta.engine.runner import chunked_prefill, rope_tables


def batch_kv_bytes(cfg: ModelConfig, n_seqs: int, tokens: int, block: int, dtype_bytes: int) -> int:
    """Bytes of a BatchKVCache: n_seqs slabs of kv_capacity(tokens, block) positions (the batch kind's preflight
    sizes it so, greta/probe/kinds/batch.py)."""
    return n_seqs * kv_capacity(tokens, block) * cfg.kv_bytes_per_token(dtype_bytes)


class _SlabView:
    """One sequence's slab as a single-sequence cache: layer(i) -> (k, v) [Hkv, capacity, D], contiguous."""

    def __init__(self, cache: "BatchKVCache", b: int):
        self.cache, self.b = cache, b
        self.capacity = cache.capacity

    def layer(self, i: int):
        return self.cache.k[i, self.b], self.cache.v[i, self.b]


class BatchKVCache:
    """K and V of n_seqs sequences: [n_layers, n_seqs, n_kv_heads, capacity, head_dim]; layer(i) gives the
    batch's (k, v) [n_seqs, Hkv, capacity, D], sequence(b) one sequence's slab as a single-sequence cache."""

    def __init__(self, cfg: ModelConfig, n_seqs: int, tokens: int, block: int, dtype: torch.dtype, device):
        self.n_seqs, self.capacity = n_seqs, kv_capacity(tokens, block)
        shape = (cfg.n_layers, n_seqs, cfg.n_kv_heads, self.capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def sequence(self, b: int) -> _SlabView:
        if not 0 <= b < self.n_seqs:
            raise IndexError(f"sequence {b} is not in a batch of {self.n_seqs}")
        return _SlabView(self, b)

    def reset(self, b: int | None = None):
        """Zero every slab, or sequence b's."""
        for t in (self.k, self.v):
            (t if b is None else t[:, b]).zero_()

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class BatchRunner:
    """A model ready to run n_seqs sequences: their KV slabs, rope tables, the backend (make_ops) for prefill
    and its batch wrapper for decode, both under the negative control `perturb` names. max_tokens is per
    sequence (the slab), and it fixes the rope tables as a Runner with the same max_tokens has them."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], *, n_seqs: int, max_tokens: int,
                 kv_aligned: bool, chunk: int, kv_block: int, perturb: str = "none", backend: str = "torch"):
        if n_seqs < 1:
            raise ValueError(f"a batch holds at least one sequence, got n_seqs={n_seqs}")
        self.cfg, self.w, self.chunk, self.kv_block, self.kv_aligned = cfg, weights, chunk, kv_block, bool(kv_aligned)
        emb = weights["embed"]
        self.device = emb.device
        # room for a padded last tile per sequence, as Runner's cache has
        self.cache = BatchKVCache(cfg, n_seqs, cache_tokens(max_tokens, chunk), kv_block, emb.dtype, self.device)
        self.cos, self.sin = rope_tables(cfg, self.cache.capacity + 1, self.device, seq_len=max_tokens)
        inner = make_ops(backend, self.kv_aligned, self.cos, self.sin, chunk=chunk, kv_block=kv_block)
        self.ops = with_control(inner, perturb)
        self.batch_ops = with_control(batch_ops(inner), perturb)
        # CUDA graphs where the backend's step reads nothing back on the host: Triton (kv1), the kv0 fast path
        # (batched flash-decoding), under any control (they move positions on the device or split linears)
        self.graphable = graphable(inner, self.device)
        self._graphs: dict[int, tuple] = {}  # rows -> (graph, tokens, positions, seqs, logits)

    @torch.inference_mode()
    def prefill(self, b: int, tokens: torch.Tensor, start: int = 0, keep: list[int] | None = None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Sequence b's tokens at positions start.. into its slab, in chunks; fp32 logits [len(keep), V]."""
        view = self.cache.sequence(b)

        def run(tok, pos, rows, decode):
            return forward(self.ops, self.cfg, self.w, view, self.ops.plan(tok, pos, rows, decode))

        return chunked_prefill(run, tokens, start, keep, chunk=self.chunk, aligned=self.kv_aligned,
                               device=self.device, progress=progress)

    @torch.inference_mode()
    def decode(self, tokens, positions, seqs) -> torch.Tensor:
        """One decode step: row r is token tokens[r] of sequence seqs[r] at position positions[r] (each
        sequence at most once). Returns fp32 logits [rows, V] in the rows' order."""
        host_pos, host_seq = _ints(positions), _ints(seqs)
        tok = torch.as_tensor(tokens, device=self.device).reshape(-1).to(torch.int64)
        if not tok.numel() == len(host_pos) == len(host_seq) or len(set(host_seq)) != len(host_seq):
            raise ValueError("decode takes one token and one position per sequence, each sequence at most once")
        if min(host_seq) < 0 or max(host_seq) >= self.cache.n_seqs:
            raise IndexError(f"decode names a sequence outside the batch of {self.cache.n_seqs}")
        pos = torch.tensor(host_pos, device=self.device)
        seq = torch.tensor(host_seq, device=self.device)
        if self.graphable:
            return self._decode_graphed(tok, pos, seq)
        return self._step(tok, pos, seq, self._layout(host_pos, host_seq))

    def _layout(self, pos: list[int], seq: list[int]) -> dict:
        """What the eager batch ops (ops/batch.py BatchOps, TorchBatchOps) would otherwise read back from the
        device: each sequence's rows, and how far attention reads (the furthest position + 1). The graphable
        ones read neither: their attention takes the sequence ids and positions as device tensors."""
        return {"seq_groups": [(b, [r]) for r, b in enumerate(seq)], "kv_end": max(pos) + 1}

    def _step(self, tok, pos, seq, layout: dict | None) -> torch.Tensor:
        """One step's forward. layout: what an eager step's ops would otherwise read back (_layout); None for a
        step to be captured, which must read nothing back (a captured layout would be the first step's)."""
        step = self.batch_ops.plan_batch(tok, pos, seq)
        if layout and getattr(self.batch_ops, "rows_as_given", False):  # the step's rows are the rows given
            for key, value in layout.items():
                step.once(key, lambda value=value: value)
        return forward(self.batch_ops, self.cfg, self.w, self.cache, step)

    def _decode_graphed(self, tok, pos, seq) -> torch.Tensor:
        """The step replayed from a CUDA graph, one per row count (sequences, positions and tokens are device
        inputs of the graph). Captured as Runner captures its decode: run twice eagerly on a side stream (the
        same inputs, the same cache writes), then captured."""
        key = tok.numel()
        if key not in self._graphs:
            ins = (tok.clone(), pos.clone(), seq.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(*ins, None)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step(*ins, None)
            self._graphs[key] = (graph, *ins, out)
        graph, g_tok, g_pos, g_seq, out = self._graphs[key]
        g_tok.copy_(tok)
        g_pos.copy_(pos)
        g_seq.copy_(seq)
        graph.replay()
        return out.clone()  # the next replay overwrites the graph's output buffer


def _ints(values) -> list[int]:
    """Host integers from a list, or a tensor read back once."""
    values = values.tolist() if isinstance(values, torch.Tensor) else values
    return [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]


# --- the three ways of computing a request's logits (the batch probe's (a), (b), (c)) ---------------------
def prefill_all(br: BatchRunner, prompts: list[torch.Tensor], progress=None) -> list[torch.Tensor]:
    """Every sequence's prompt into its slab, one after the other; each one's logits at its last position."""
    firsts = []
    for b, prompt in enumerate(prompts):
        firsts.append(br.prefill(b, prompt)[0])
        if progress:
            progress(b + 1, len(prompts))
    return firsts


def decode_together(br: BatchRunner, lengths: list[int], firsts: list[torch.Tensor], gens: list[int],
                    keep: int, on_step=None) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """(b): greedy decode of every sequence in one batch, sequence b for gens[b] steps from position
    lengths[b] (its first token: the argmax of firsts[b]); a sequence that is done leaves the batch.
    Returns per sequence its tokens (gens[b] + 1: the prefill's, then one per step) and the logits of its
    first `keep` decode steps. on_step(j, rows) after each step."""
    n = len(lengths)
    tokens = [[int(f.argmax())] for f in firsts]
    kept: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for j in range(max(gens, default=0)):
        live = [b for b in range(n) if j < gens[b]]
        logits = br.decode([tokens[b][-1] for b in live], [lengths[b] + j for b in live], live)
        nxt = logits.argmax(-1).tolist()  # the one host sync per step: reading the sampled tokens
        for r, b in enumerate(live):
            tokens[b].append(int(nxt[r]))
            if j < keep:
                kept[b].append(logits[r])
        if on_step:
            on_step(j, len(live))
    return tokens, kept


def decode_alone(br: BatchRunner, b: int, length: int, tokens: list[int], steps: int) -> list[torch.Tensor]:
    """(a): sequence b decoded alone (a batch of one), teacher-forced on its tokens from the batch run (so
    its steps see the same inputs); logits of its first `steps` decode steps. Its slab must hold its prompt
    (positions written here are rewritten in order, so leftovers of the batch run are never read)."""
    return [br.decode([tokens[j]], [length + j], [b])[0] for j in range(steps)]


def reference(br: BatchRunner, b: int, prompt: torch.Tensor, tokens: list[int], steps: int) -> torch.Tensor:
    """(c): the teacher-forced prefill of prompt + tokens[:steps] into sequence b's (reset) slab; logits at
    the prompt's last position and the `steps` decode positions after it: [steps + 1, V]."""
    br.cache.reset(b)
    n = prompt.numel()
    seq = torch.cat([prompt, torch.tensor(tokens[:steps], device=prompt.device, dtype=prompt.dtype)])
    return br.prefill(b, seq, keep=list(range(n - 1, n + steps)))
