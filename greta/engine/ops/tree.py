"""The tp-invariant mode on one device: the row-parallel linears (wo, w2) walk the segment tree of their K
(docs/TP.md) inside the backend's GEMM and round once, so a one-device run gives the bits that any
tensor-parallel degree the tree allows gives (ops/tp_ops.py: TPOps with segments, each rank a subtree)."""
from __future__ import annotations

from greta.engine.ops.base import Ops, OpsWrapper, Step


class TreeOrder(OpsWrapper):
    def __init__(self, inner: Ops, segments: int):
        super().__init__(inner)
        self.segments = segments

    def linear_reduce(self, x, w, step: Step):
        return self.inner.tree_linear(x, w, self.segments, x.dtype)
