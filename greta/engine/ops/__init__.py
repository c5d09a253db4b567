"""Backends of the decoder's ops (see base.Ops): the kv_aligned=0 fast path (CudaFastOps on CUDA, plain torch
elsewhere), tiled torch and Triton (kv_aligned=1), and the negative controls that wrap any of them."""
from __future__ import annotations

from greta.engine.ops.base import Ops, OpsWrapper, Step
from greta.engine.ops.controls import PERTURBATIONS, with_control

from greta.engine.backends import PARAM_BACKENDS, backend_of, choose


def make_ops(backend: str, kv_aligned: bool, cos, sin, *, chunk: int, kv_block: int,
             tp_invariant: bool = False) -> Ops:
    """The backend for a run, as engine/backends.py chooses it: the exact backend the param names where
    kv_aligned=1 (triton, or tiled torch for backend=torch); kv_aligned=0 is the device's fast path whichever
    backend is named (CudaFastOps on CUDA, plain torch elsewhere). tp_invariant: tiled torch runs its
    transcendental elementwise ops by whole vectors (ops/tiled_torch.py)."""
    entry = choose(backend, kv_aligned, cos.is_cuda)
    return entry.ops_class().build(cos, sin, chunk=chunk, kv_block=kv_block, tp_invariant=tp_invariant)


def batch_ops(inner: Ops) -> Ops:
    """The batch decode step's ops over backend inner (ops/batch.py: one row per live sequence)."""
    from greta.engine.ops.batch import batch_ops as wrap

    return wrap(inner)


def graphable(ops: Ops, device) -> bool:
    """A runner on device may capture ops' decode step in a CUDA graph (the backend declares it can)."""
    return device.type == "cuda" and backend_of(ops).graphable


def tp_reduce(tp, kv_aligned: bool, tree_segments: int = 0, *, max_numel: int, dtype, device):
    """The sum over the ranks of tp (engine.tp.TPGroup) a run's row-parallel products take, reduce(x, group):
    kv_aligned=1 tp's exact reduction (its one-shot buffer sized for max_numel elements of dtype), kv_aligned=0
    the library's all_reduce; tree_segments > 0 (the tp-invariant mode) completes the fp32 tree
    (dist.tree_all_reduce, on CUDA too: the one-shot adds in rank order). One per runner: its prefill and decode
    ops and its batch ops share it (and its buffer)."""
    from greta.engine import dist

    if tree_segments:
        return dist.tree_all_reduce
    if not kv_aligned:
        return dist.library_all_reduce
    return dist.exact_reduction(tp.exact, max_numel=max_numel, dtype=dtype, device=device, group=tp.group)


def with_tp(ops: Ops, tp, reduce, *, segments: int = 0) -> Ops:
    """ops as one rank of the tensor-parallel group tp: the row-parallel products summed by reduce (tp_reduce),
    the logits gathered. segments > 0: the tp-invariant mode, this rank's S / tp segments of the tree, its fp32
    subtree completed by the reduction."""
    from greta.engine.ops.tp_ops import TPOps

    return TPOps(ops, tp.group, reduce, segments)


def with_tree(ops: Ops, segments: int) -> Ops:
    """ops on one device in the tp-invariant mode: wo and w2 walk the tree of `segments` (ops/tree.py)."""
    from greta.engine.ops.tree import TreeOrder

    return TreeOrder(ops, segments)


__all__ = ["PARAM_BACKENDS", "Ops", "OpsWrapper", "PERTURBATIONS", "Step", "backend_of", "batch_ops", "graphable",
           "make_ops", "tp_reduce", "with_control", "with_tp", "with_tree"]
