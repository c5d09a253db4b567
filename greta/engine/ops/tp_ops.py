"""Tensor parallelism as an ops wrapper: the rank's backend runs the one decoder loop on its shard of the
heads and the MLP (greta/engine/tp.py); this wrapper adds the two collectives Megatron's layout needs.

linear_reduce (wo, w2): the inner backend's product of this rank's columns, then the sum over ranks.
  kv_aligned=1 sums with an exact reduction (dist.rank_order_all_reduce or dist.OneShotReduce: the order
  of additions is fixed by rank, whatever the message size); kv_aligned=0 with the library's all_reduce
  (NCCL's fastest; its order follows the message size, so kv0 drifts a little more).
  Only the step's real rows are reduced (step.kv_rows; a tiled backend pads a decode row into a full tile):
  a decode step sends one row, as a real engine should, and so the reduction sees decode's message size,
  not prefill's. The padding rows keep this rank's partial: each row's arithmetic is its own (matmuls,
  norms, attention queries are row-wise; padding rows write no K/V), so they never reach a real row.
  The tp-invariant mode (segments > 0, docs/TP.md): the rank's product is its subtree of the segment tree,
  in fp32, unrounded (inner.tree_linear); the reduction (dist.tree_all_reduce) completes the same tree in
  fp32 and the sum is rounded once to the model's dtype, here: the bits of tp=1's one GEMM.
lm_head: this rank's slice of the vocabulary's logits, gathered along the vocabulary (every rank returns
  the full logits; a gather has no arithmetic).
"""
from __future__ import annotations

import torch

from greta.engine.dist import gather_columns
from greta.engine.ops.base import Ops, OpsWrapper, Step


class TPOps(OpsWrapper):
    def __init__(self, inner: Ops, group, reduce, segments: int = 0):
        """segments: this rank's segments of the tree (S / tp); 0: the plain per-rank K order."""
        super().__init__(inner)
        self.group, self.reduce, self.segments = group, reduce, segments

    def linear_reduce(self, x, w, step: Step):
        return self.reduced(self.partial(x, w, step), step, self.reduce, x.dtype)

    def partial(self, x, w, step: Step):
        """This rank's share of x @ w.T (its columns of w), not yet summed: in the tree mode its subtree in
        fp32, else the inner backend's product in x's dtype."""
        if self.segments:
            return self.inner.tree_linear(x, w, self.segments, torch.float32)
        return self.inner.linear_reduce(x, w, step)

    def reduced(self, partial, step: Step, reduce, dtype):
        """partial's real rows summed over the ranks by reduce(x, group), rounded once to dtype."""
        rows = step.kv_rows
        if rows is None:
            return reduce(partial, self.group).to(dtype)
        partial[rows] = reduce(partial[rows], self.group)
        return partial.to(dtype)

    def lm_head(self, x, norm, head, eps, step: Step):
        return gather_columns(self.inner.lm_head(x, norm, head, eps, step), self.group)
