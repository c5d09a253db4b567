"""Decode of several sequences in one step, over any backend (greta/engine/runner.py decode_batch runs it).

A batch decode step holds one row per live sequence; `Step.seq` says which sequence (an index into the
batch's KV slabs, kv = (k, v) each [n_seqs, Hkv, capacity, D]) each row belongs to. Everything row-wise
(embedding, norms, the linears, RoPE, SwiGLU, lm_head) runs once over all rows; only the KV write and the
attention look at `seq`: a row writes its own slab, and attends over its own sequence's keys 0..pos with the
backend's single-sequence attention on that slab. Prefill is not batched: it runs sequence by sequence
through the backend itself (the runner hands it one slab), so a request's prefill is the single-sequence
prefill, bit for bit.

  BatchOps       the row-wise ops as the backend has them: ONE linear of M = rows (TorchOps at kv_aligned=0,
                 TritonOps, whose GEMM is batch-invariant in M: its K loop is the same for every M).
  TiledBatchOps  the tiled torch backend (kv_aligned=1 on torch): its invariance is a row at a fixed place in
                 a fixed-shape tile, so rows are laid into tiles (see its docstring).
  TritonBatchOps, FastBatchOps  attention of every row in one kernel launch over the slabs (kv_aligned=1:
                 the exact batch decode; kv_aligned=0 on CUDA: batched flash-decoding), graphable.
  TorchBatchOps  the kv_aligned=0 torch path (the CPU): plain softmax(q K^T) V batched over the slabs.
"""
from __future__ import annotations

import math

import torch

from greta.engine.ops.base import Ops, OpsWrapper, Step


def seq_groups(step: Step) -> list[tuple[int, list[int]]]:
    """[(sequence, its rows in the step)] in order of first appearance; kept with the step (one host read)."""
    def make():
        groups: dict[int, list[int]] = {}
        for r, b in enumerate(step.seq.tolist()):
            groups.setdefault(b, []).append(r)
        return list(groups.items())
    return step.once("seq_groups", make)


def slab(kv, b: int):
    """Sequence b's (k, v) [Hkv, capacity, D]: contiguous views, the layout a single-sequence backend takes."""
    return kv[0][b], kv[1][b]


class BatchOps(OpsWrapper):
    """A backend's ops for a batch decode step: rows of several sequences (see the module docstring)."""

    rows_as_given = True  # plan_batch keeps the rows as given: a runner may preset their layout (seq_groups)

    def plan_batch(self, tokens: torch.Tensor, pos: torch.Tensor, seq: torch.Tensor) -> Step:
        """One decode row per sequence: tokens, pos, seq [n]; lm_head returns the rows in the given order."""
        return Step(tokens, pos, True, list(range(tokens.numel())), seq=seq)

    def write_kv(self, kv, k, v, step: Step) -> None:
        rows = step.kv_rows
        seq, pos = (step.seq, step.pos) if rows is None else (step.seq[rows], step.pos[rows])
        k, v = (k, v) if rows is None else (k[rows], v[rows])
        kv[0][seq, :, pos] = k  # [rows, Hkv, D]: advanced indices on either side of a slice come first
        kv[1][seq, :, pos] = v

    def decode_attention(self, q, kv, step: Step):
        """Each sequence's rows over its own slab, by the backend's single-sequence decode attention."""
        out = torch.empty_like(q)
        for b, rows in seq_groups(step):
            sub = _sub_step(step, rows)
            out[rows] = self.inner.decode_attention(q[rows], slab(kv, b), sub)
        return out

    def prefill_attention(self, q, kv, step: Step):
        raise NotImplementedError("batch prefill runs sequence by sequence through the backend itself")

    def lm_head(self, x, norm, head, eps, step: Step):
        """The rows' logits with ONE linear over them (M = rows). plan_batch's rows are 0..n-1: a view, no
        host-built index (so the step can be captured in a CUDA graph)."""
        x = x[:len(step.rows)]
        return self.linear(self.rmsnorm(x, norm, eps), head).float()


def _sub_step(step: Step, rows: list[int]) -> Step:
    """The step's rows of one sequence, as the single-sequence backend sees a step (no seq)."""
    idx = torch.tensor(rows, device=step.pos.device)
    return Step(step.tokens[idx], step.pos[idx], step.decode, list(range(len(rows))))


class TiledBatchOps(BatchOps):
    """Batch decode on the tiled torch backend (kv_aligned=1, ops/tiled_torch.py).

    There a row's bits are the same in decode and prefill because it sits at the same place, row pos % chunk,
    of a tile of the same shape, so every op (matmul kernel choice, vectorised main loop or scalar tail,
    thread split) treats it alike. A batch keeps that: each sequence's row goes to slot pos % chunk of a
    tile; two rows that want the same slot cannot share a tile, so the later one spills into the next tile
    (as many tiles as the most-wanted slot has rows). Every op then runs tile by tile, on [chunk, ...] as
    prefill does, and attention runs per (tile, sequence in it) over that sequence's slab with the whole tile
    as queries: the same shapes as prefill, and rows of other sequences or filler rows only occupy other
    places in the tile (a row's arithmetic does not read them; blocks past its position are masked to no-ops,
    as in the single-sequence backend). Filler rows copy the tile's first real row and write no KV.
    """

    rows_as_given = False  # rows are laid into tiles

    def plan_batch(self, tokens, pos, seq) -> Step:
        t = self.inner.chunk
        slots = (pos % t).tolist()
        tiles: list[dict[int, int]] = []  # per tile: slot -> input row
        for r, s in enumerate(slots):
            free = next((tile for tile in tiles if s not in tile), None)
            if free is None:
                free = {}
                tiles.append(free)
            free[s] = r
        where = torch.empty(tokens.numel(), dtype=torch.int64)  # input row -> row of the tiled layout
        layout = []
        for i, tile in enumerate(tiles):
            first = min(tile.values())  # filler: the tile's first real row
            src = [tile.get(s, first) for s in range(t)]
            layout += src
            for s, r in tile.items():
                where[r] = i * t + s
        src = torch.tensor(layout, device=pos.device)
        where = where.to(pos.device)
        return Step(tokens[src], pos[src], True, where.tolist(), kv_rows=where, seq=seq[src])

    def _tiles(self, fn, *xs):
        t = self.inner.chunk
        n = xs[0].shape[0]
        if n == t:
            return fn(*xs)
        return torch.cat([fn(*(x[i:i + t] for x in xs)) for i in range(0, n, t)])

    def rmsnorm(self, x, w, eps):
        return self._tiles(lambda xt: self.inner.rmsnorm(xt, w, eps), x)

    add_rmsnorm = Ops.add_rmsnorm  # through this class's rmsnorm: the inner backend's would skip the tiling

    def linear(self, x, w):
        return self._tiles(lambda xt: self.inner.linear(xt, w), x)

    def linear_reduce(self, x, w, step: Step):
        t = self.inner.chunk
        return self._tiles(lambda xt, i: self.inner.linear_reduce(xt, w, _tile_step(step, int(i[0]), t)), x,
                           torch.arange(x.shape[0]))

    def swiglu(self, gate, up):
        return self._tiles(self.inner.swiglu, gate, up)

    def rope(self, x, step: Step):
        t = self.inner.chunk
        return self._tiles(lambda xt, i: self.inner.rope(xt, _tile_step(step, int(i[0]), t)), x,
                           torch.arange(x.shape[0]))

    def decode_attention(self, q, kv, step: Step):
        t = self.inner.chunk
        out = torch.empty_like(q)
        for i in range(0, q.shape[0], t):
            tile = _tile_step(step, i, t)
            for b, rows in seq_groups(tile):
                o = self.inner.decode_attention(q[i:i + t], slab(kv, b), tile)
                out[[i + r for r in rows]] = o[rows]
        return out

    def lm_head(self, x, norm, head, eps, step: Step):
        """Every tile's logits (fixed shapes), then step.rows."""
        logits = self._tiles(lambda xt: self.inner.linear(self.inner.rmsnorm(xt, norm, eps), head).float(), x)
        return logits[step.rows]


def _tile_step(step: Step, i: int, t: int) -> Step:
    """Rows i..i+t of a tiled step: a tile as the single-sequence backend sees one (kept with the step)."""
    return step.once(("tile", i), lambda: Step(step.tokens[i:i + t], step.pos[i:i + t], step.decode,
                                                list(range(t)), seq=step.seq[i:i + t]))


class TritonBatchOps(BatchOps):
    """Batch decode on the Triton kernels: attention of every row in one launch of the batched decode kernel
    (kernels/batch_attention.py: per row the single-sequence decode program, on its own slab), and nothing
    that syncs with the host, so the runner can capture the step in a CUDA graph."""

    def decode_attention(self, q, kv, step: Step):
        return self.inner.k.batch_decode_attention(q, kv[0], kv[1], step.seq, step.pos)


class FastBatchOps(BatchOps):
    """Batch decode on the kv_aligned=0 CUDA fast path (CudaFastOps): every row's attention in one batched
    flash-decoding launch, each row over its own slab up to its own position (kernels/flash_decode.py
    flash_decode_batch, the single-sequence flash_decode's program with a row axis); the row-wise ops are
    CudaFastOps' (cuBLAS linears of M = rows, Triton RMSNorm/RoPE/SwiGLU). Positions and sequence ids stay on
    the device, so the runner captures the step in a CUDA graph, one per row count."""

    def decode_attention(self, q, kv, step: Step):
        return self.inner.k.flash_decode_batch(q, kv[0], kv[1], step.seq, step.pos)


class TorchBatchOps(BatchOps):
    """Batch decode on the kv_aligned=0 torch path: TorchOps' decode attention (plain softmax(q K^T / sqrt(D)) V
    per GQA group) for all rows at once, batched over the rows' slabs up to the furthest position, each row
    masked to its own keys 0..pos. K and V are read in place when the rows are consecutive sequences (as when
    the whole batch is live), gathered otherwise. The batched matmuls round unlike the single-row ones and the
    SDPA prefill: the drift the batch probe measures. How far to read, `kv_end` (at least the furthest position
    + 1), is the step's (the runner sets it from the host's positions, engine.runner.host_layout, so the step
    reads nothing back); without it, it is read from the device. On CUDA the kv_aligned=0 path is FastBatchOps; this one runs
    where CudaFastOps does not (the CPU, or CUDA without triton), never from a CUDA graph."""

    def decode_attention(self, q, kv, step: Step):
        n, H, D = q.shape
        seqs = [b for b, _ in seq_groups(step)]
        end = step.once("kv_end", lambda: int(step.pos.max()) + 1)
        if seqs == list(range(seqs[0], seqs[0] + n)):
            k, v = kv[0][seqs[0]:seqs[0] + n, :, :end], kv[1][seqs[0]:seqs[0] + n, :, :end]
        else:
            k, v = kv[0][step.seq, :, :end], kv[1][step.seq, :, :end]
        qg = q.view(n, k.shape[1], -1, D)  # [n, Hkv, G, D]
        s = (qg @ k.transpose(-1, -2)).float() / math.sqrt(D)  # [n, Hkv, G, end]
        s = s.masked_fill(torch.arange(end, device=q.device) > step.pos[:, None, None, None], -math.inf)
        return (s.softmax(-1).to(v.dtype) @ v).reshape(n, H, D)


def batch_ops(inner: Ops) -> BatchOps:
    """The batch wrapper its backend declares (engine/backends.py): TiledBatchOps for tiled torch, TritonBatchOps
    for Triton, FastBatchOps for the kv_aligned=0 CUDA fast path, TorchBatchOps for the kv_aligned=0 torch path."""
    from greta.engine.backends import backend_of

    return backend_of(inner).batch_class()(inner)
