"""The probe's negative controls: wrappers around a backend's ops that break decode on purpose, so an audit
that cannot tell them from a correct run is shown to be blind. Prefill (the reference) is left alone.

rope_offset:   decode's RoPE positions are shifted by +1.
kv_off_by_one: decode's attention drops the newest key (each query sees keys 0..pos-1).
batch_split_k: a batch-dependent op (the batch probe's control): while a batch decode step holds more than
               one sequence (M > 1 rows for the untiled backends), every linear sums two K halves (split-K),
               as a library picking a split-K kernel for larger M would. Alone (one sequence) and prefill
               are left as they are, so in-batch logits differ from alone and from the reference.
"""
from __future__ import annotations

from greta.engine.ops.base import Ops, OpsWrapper, Step


class RopeOffset(OpsWrapper):
    def rope(self, x, step: Step):
        return self.inner.rope(x, step.moved(1) if step.decode else step)


class KvOffByOne(OpsWrapper):
    def decode_attention(self, q, kv, step: Step):
        return self.inner.decode_attention(q, kv, step.moved(-1))


class BatchSplitK(OpsWrapper):
    """Split-K linears in a batch decode step of more than one sequence. Which step is current is known from
    plan / plan_batch, which lay out each step before its ops run (ops/batch.py); a linear itself cannot tell
    a batch from a tile of the tiled backend, whose M is always the tile."""

    batched = False

    def plan(self, tokens, pos, rows, decode) -> Step:
        self.batched = False
        return self.inner.plan(tokens, pos, rows, decode)

    def plan_batch(self, tokens, pos, seq) -> Step:
        self.batched = seq.numel() > 1  # a batch step holds each sequence once; no host sync (CUDA graphs)
        return self.inner.plan_batch(tokens, pos, seq)

    def linear(self, x, w):
        return self._split(self.inner.linear, x, w)

    def linear_reduce(self, x, w):
        return self._split(self.inner.linear_reduce, x, w)

    def _split(self, op, x, w):
        if not self.batched:
            return op(x, w)
        h = x.shape[1] // 2
        return op(x[:, :h].contiguous(), w[:, :h].contiguous()) + op(x[:, h:].contiguous(), w[:, h:].contiguous())


CONTROLS = {"none": None, "rope_offset": RopeOffset, "kv_off_by_one": KvOffByOne, "batch_split_k": BatchSplitK}
PERTURBATIONS = tuple(CONTROLS)


def with_control(ops: Ops, perturb: str) -> Ops:
    """ops, wrapped in the negative control `perturb` names ("none": ops as they are)."""
    if perturb not in CONTROLS:
        raise ValueError(f"perturb must be one of {PERTURBATIONS}, got {perturb!r}")
    wrap = CONTROLS[perturb]
    return ops if wrap is None else wrap(ops)
