"""Backends of the decoder's ops (see base.Ops): the kv_aligned=0 fast path (CudaFastOps on CUDA, plain torch
elsewhere), tiled torch and Triton (kv_aligned=1), and the negative controls that wrap any of them."""
from __future__ import annotations

from greta.engine.ops.base import Ops, OpsWrapper, Step
from greta.engine.ops.controls import PERTURBATIONS, with_control

BACKENDS = ("torch", "triton")


def make_ops(backend: str, kv_aligned: bool, cos, sin, *, chunk: int, kv_block: int,
             tp_invariant: bool = False) -> Ops:
    """The backend for a run. backend=triton runs the kernels only where they are needed (kv_aligned=1);
    kv_aligned=0 is the fast path whichever backend is named: CudaFastOps on CUDA (cuBLAS, SDPA,
    flash-decoding, graphable), plain torch (TorchOps) elsewhere. tp_invariant: tiled torch runs its
    transcendental elementwise ops by whole vectors (ops/tiled_torch.py)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be torch or triton, got {backend!r}")
    if not kv_aligned:
        if cos.is_cuda and _has_triton():
            from greta.engine.ops.cuda_fast import CudaFastOps

            return CudaFastOps(cos, sin)
        from greta.engine.ops.torch_ops import TorchOps

        return TorchOps(cos, sin)
    if backend == "triton":
        from greta.engine.ops.triton_ops import TritonOps

        return TritonOps(cos, sin, kv_block)
    from greta.engine.ops.tiled_torch import TiledTorchOps

    return TiledTorchOps(cos, sin, chunk, kv_block, whole_vectors=tp_invariant)


def _has_triton() -> bool:
    from greta import kernels

    return kernels.triton is not None


def with_tp(ops: Ops, tp, kv_aligned: bool, *, max_numel: int, dtype, device, segments: int = 0) -> Ops:
    """ops as one rank of the tensor-parallel group tp (engine.tp.TPGroup): kv_aligned=1 reduces with tp's
    exact reduction (its one-shot buffer sized for max_numel elements of dtype), kv_aligned=0 with the
    library's all_reduce. segments > 0: the tp-invariant mode, this rank's S / tp segments of the tree, its
    fp32 subtree completed by dist.tree_all_reduce (on CUDA too: the one-shot adds in rank order)."""
    from greta.engine import dist
    from greta.engine.ops.tp_ops import TPOps

    if segments:
        return TPOps(ops, tp.group, dist.tree_all_reduce, segments)
    if not kv_aligned:
        return TPOps(ops, tp.group, dist.library_all_reduce)
    reduce = dist.exact_reduction(tp.exact, max_numel=max_numel, dtype=dtype, device=device, group=tp.group)
    return TPOps(ops, tp.group, reduce)


def with_tree(ops: Ops, segments: int) -> Ops:
    """ops on one device in the tp-invariant mode: wo and w2 walk the tree of `segments` (ops/tree.py)."""
    from greta.engine.ops.tree import TreeOrder

    return TreeOrder(ops, segments)


__all__ = ["BACKENDS", "Ops", "OpsWrapper", "PERTURBATIONS", "Step", "make_ops", "with_control", "with_tp", "with_tree"]
