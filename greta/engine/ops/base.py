"""The ops interface the one decoder loop (greta/engine/model.py) is written against.

A backend is an object with the methods of `Ops`. The loop never looks at a backend's internals, and a
backend never sees the loop: it gets tensors and a `Step`. So a tensor-parallel backend (linear_reduce
sums the shards' partial products), a batched one (Step grows per-row sequence ids) or a negative control
(greta/engine/ops/controls.py wraps one op) slots in without touching the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class Step:
    """One forward call in the rows a backend computes (its `plan` lays them out).

    tokens, pos: [T] token ids and absolute positions of the rows the ops run on (a backend may pad them).
    decode:      the one-token decode path (attention then calls decode_attention).
    rows:        rows whose logits lm_head returns, in order.
    kv_rows:     rows whose K/V are written to the cache (None: all of them; padding rows are not).
    seq:         [T] the sequence each row belongs to, an index into a batch's KV slabs (None: one sequence,
                 the cache is one layer's (k, v); see greta/engine/runner.py decode_batch and ops/batch.py).
    """
    tokens: torch.Tensor
    pos: torch.Tensor
    decode: bool
    rows: list[int]
    kv_rows: torch.Tensor | None = None
    seq: torch.Tensor | None = None
    _moved: dict = field(default_factory=dict, compare=False, repr=False)
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def moved(self, by: int) -> "Step":
        """The same rows at positions pos + by (the negative controls); made once per step, so a captured
        CUDA graph holds one integer add however many layers ask."""
        if by not in self._moved:
            self._moved[by] = replace(self, pos=self.pos + by, _moved={}, _memo={})
        return self._moved[by]

    def once(self, key: str, make):
        """make() computed once per step and kept with it (e.g. rope tables at the step's positions, which
        every layer would otherwise gather again)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


class Ops:
    """The decoder's operations. Shapes: x [T, hidden]; q [T, H, D]; k, v [T, Hkv, D]; a weight [N, K] in
    nn.Linear layout. kv is one layer's (k_cache, v_cache), each [Hkv, capacity, D]."""

    @classmethod
    def build(cls, cos, sin, *, chunk: int, kv_block: int, tp_invariant: bool = False) -> Ops:
        """The backend for a run's rope tables and tiles (greta.engine.ops.make_ops); a backend that needs
        more than the tables overrides it."""
        return cls(cos, sin)

    def plan(self, tokens: torch.Tensor, pos: torch.Tensor, rows: list[int], decode: bool) -> Step:
        """Lay out one call's rows (default: as given, one row per token)."""
        return Step(tokens, pos, decode, list(rows))

    def embed(self, table: torch.Tensor, step: Step) -> torch.Tensor:
        return table[step.tokens]

    def rmsnorm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def add_rmsnorm(self, x: torch.Tensor, d: torch.Tensor, w: torch.Tensor, eps: float):
        """The residual add and the next norm: (rmsnorm(x + d), x + d). A backend may fuse the two into one
        kernel that rounds the sum as the add does (one launch fewer, the same bits)."""
        x = x + d
        return self.rmsnorm(x, w, eps), x

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T (the column-parallel projections: wqkv, w13)."""
        raise NotImplementedError

    def add_bias(self, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y + b, a linear's bias (Qwen2's q/k/v) added to its rows [T, N]: elementwise, so a row's result does
        not depend on the rows beside it, in every backend."""
        return y + b

    def linear_reduce(self, x: torch.Tensor, w: torch.Tensor, step: Step) -> torch.Tensor:
        """x @ w.T whose result is added to the residual (wo, w2): where a tensor-parallel backend sums its
        shards' partial products (over step's real rows: ops/tp_ops.py)."""
        return self.linear(x, w)

    def tree_linear(self, x: torch.Tensor, w: torch.Tensor, segments: int, dtype: torch.dtype) -> torch.Tensor:
        """x @ w.T in the segment tree's K order (docs/TP.md): w's K in `segments` equal segments, each an fp32
        partial, added by kernels/reference.py's tree_sum_ref in fp32, rounded once to dtype (float32: the
        unrounded subtree a tensor-parallel rank sends). Only the kv_aligned=1 backends have it."""
        raise NotImplementedError(f"{type(self).__name__} has no segment-tree linear (kv_aligned=1 backends only)")

    def rope(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """Rotary embedding of x [T, heads, D] at step.pos."""
        raise NotImplementedError

    def write_kv(self, kv, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        """Store the step's keys and values at their positions."""
        rows = step.kv_rows
        pos, k, v = (step.pos, k, v) if rows is None else (step.pos[rows], k[rows], v[rows])
        kv[0][:, pos] = k.transpose(0, 1)
        kv[1][:, pos] = v.transpose(0, 1)

    def prefill_attention(self, q: torch.Tensor, kv, step: Step) -> torch.Tensor:
        """Causal attention of q [T, H, D] over keys 0..pos of each row -> [T, H, D]."""
        raise NotImplementedError

    def decode_attention(self, q: torch.Tensor, kv, step: Step) -> torch.Tensor:
        """Attention of one position's query over keys 0..pos -> [T, H, D]."""
        raise NotImplementedError

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lm_head(self, x: torch.Tensor, norm: torch.Tensor, head: torch.Tensor, eps: float, step: Step) -> torch.Tensor:
        """Final norm and output projection of step.rows -> fp32 logits [len(rows), V]."""
        x = x[step.rows]
        return self.linear(self.rmsnorm(x, norm, eps), head).float()


class OpsWrapper:
    """Forwards every op to `inner`; a subclass overrides the ones it changes (the negative controls)."""

    def __init__(self, inner: Ops):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)
