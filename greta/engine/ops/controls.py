"""The probe's negative controls: wrappers around a backend's ops that break decode on purpose, so an audit
that cannot tell them from a correct run is shown to be blind. Prefill (the reference) is left alone.

rope_offset:   decode's RoPE positions are shifted by +1.
kv_off_by_one: decode's attention drops the newest key (each query sees keys 0..pos-1).
tp_library_reduce: (tensor parallel, tp >= 3) the row-parallel sums of BOTH paths go through the library's
               all_reduce (NCCL, gloo) instead of the exact rank-order reduction: the plain engine's choice,
               whose order of additions follows the message size, so decode's one row is summed differently
               from the same row in prefill's chunk. Prefill is not the reference here: that is the point.
batch_split_k: a batch-dependent op (the batch probe's control): while a batch decode step holds more than
               one sequence (M > 1 rows for the untiled backends), every linear sums two K halves (split-K),
               as a library picking a split-K kernel for larger M would. Alone (one sequence) and prefill
               are left as they are, so in-batch logits differ from alone and from the reference.
"""
from __future__ import annotations

from greta.engine.dist import library_all_reduce
from greta.engine.ops.base import Ops, OpsWrapper, Step


class RopeOffset(OpsWrapper):
    def rope(self, x, step: Step):
        return self.inner.rope(x, step.moved(1) if step.decode else step)


class KvOffByOne(OpsWrapper):
    def decode_attention(self, q, kv, step: Step):
        return self.inner.decode_attention(q, kv, step.moved(-1))


class TPLibraryReduce(OpsWrapper):
    def __init__(self, inner: Ops):
        if not hasattr(inner, "reduced"):
            raise ValueError("perturb=tp_library_reduce needs a tensor-parallel run (tp >= 3)")
        super().__init__(inner)

    def linear_reduce(self, x, w, step: Step):
        return self.inner.reduced(self.inner.partial(x, w, step), step, library_all_reduce, x.dtype)


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

    def linear_reduce(self, x, w, step: Step):
        return self._split(self.inner.linear_reduce, x, w, step)

    def _split(self, op, x, w, *step):
        if not self.batched:
            return op(x, w, *step)
        h = x.shape[1] // 2
        return (op(x[:, :h].contiguous(), w[:, :h].contiguous(), *step)
                + op(x[:, h:].contiguous(), w[:, h:].contiguous(), *step))


CONTROLS = {"none": None, "rope_offset": RopeOffset, "kv_off_by_one": KvOffByOne,
            "tp_library_reduce": TPLibraryReduce, "batch_split_k": BatchSplitK}
PERTURBATIONS = tuple(CONTROLS)


def with_control(ops: Ops, perturb: str) -> Ops:
    """ops, wrapped in the negative control `perturb` names ("none": ops as they are)."""
    if perturb not in CONTROLS:
        raise ValueError(f"perturb must be one of {PERTURBATIONS}, got {perturb!r}")
    wrap = CONTROLS[perturb]
    return ops if wrap is None else wrap(ops)
