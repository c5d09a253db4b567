"""Tensor-parallel reductions, and the property the probe needs from them.

A row-parallel linear leaves each rank with a partial sum; the ranks must add them. Decode reduces one row,
prefill a chunk of thousands, so decode reproduces prefill only if a row's sum does not depend on how many
rows travel with it. Two ranks give that for free (a + b is one rounding whatever the order). From three up
a library all-reduce picks its algorithm, and so its order of additions, by message size: gloo on the CPU
and NCCL on the GPU both give rows that differ in their last bits between an M=1 and an M=2048 message
(tests/test_dist.py measures gloo; the issue's scout measured NCCL at 0.12-0.25 in bf16).

rank_order_all_reduce fixes the order by rank: every rank gathers all partials and adds them 0, 1, ...,
world-1 in fp32, then rounds once to the input dtype. Each element's arithmetic is then the same for any
message size. library_all_reduce is the fast, size-dependent one (kv_aligned=0, and the negative control).
tree_all_reduce completes the segment tree of the tp-invariant mode (docs/TP.md): the ranks' fp32 subtrees
gathered and added as the one fixed tree, so tp = 1, 2, 4, 8 give the same bits.

OneShotReduce is rank order's fast form on GPUs that map each other's memory (NVLink; torch's symmetric
memory, multicast off): each rank copies its partial into its symmetric buffer, a device-side barrier, then
one kernel (kernels/reduce.py) reads every peer's buffer and adds them 0..world-1 in fp32, rounding once, so
it gives the same bits as rank_order_all_reduce on every rank; a second barrier before the buffer is
reused. No host sync: it can be captured in a CUDA graph. Messages larger than its buffer fall back to
rank_order_all_reduce (same bits).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from greta.kernels.reference import sum_in_order_ref, tree_sum_ref


def rank_order_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of x over the group's ranks, added in rank order in fp32: bit-identical per element whatever the
    number of rows reduced together. Returns a new tensor in x's dtype."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return sum_in_order_ref(parts)


def tree_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """The segment tree's top (docs/TP.md): every rank's x (its subtree, fp32 in the tree mode) gathered and
    added as tree_sum_ref does, in fp32, in x's dtype. Rank order's additions for 2 ranks; from 4 ranks
    (r0 + r1) + (r2 + r3), the tree that one GEMM over all of K walks at tp=1."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return tree_sum_ref(parts)


def library_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """The backend's own all_reduce (NCCL, RCCL, gloo): fastest, but its order of additions may change with
    the message size. Returns a new tensor."""
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def gather_columns(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's x [rows, n] side by side, in rank order -> [rows, world * n] on every rank (the
    vocab-parallel logits: no arithmetic, so exact)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class OneShotReduce:
    """The exact reduction over peers' memory (module docstring). Holds one symmetric buffer of max_numel
    elements per rank; call it like the other reductions: reduce(x, group) -> a new tensor."""

    def __init__(self, max_numel: int, dtype: torch.dtype, device, group=None):
        import torch.distributed._symmetric_memory as symm_mem

        from greta import kernels

        group = group or dist.group.WORLD
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch; deprecated (harmless) since
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(group.group_name)
        self.max_numel, self.dtype, self.sum_in_order = max_numel, dtype, kernels.sum_in_order
        self.buffer = symm_mem.empty(max_numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group.group_name)
        world = self.handle.world_size
        self.peers = [self.handle.get_buffer(r, (max_numel,), dtype) for r in range(world)]

    def __call__(self, x: torch.Tensor, group=None) -> torch.Tensor:
        n = x.numel()
        if n > self.max_numel or x.dtype != self.dtype:
            return rank_order_all_reduce(x, group)
        self.buffer[:n].copy_(x.reshape(-1))
        self.handle.barrier(channel=0)  # every rank's partial is in place (release/acquire across the GPUs)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.sum_in_order([p[:n] for p in self.peers], out.view(-1))
        self.handle.barrier(channel=0)  # every rank has read the buffers: the next call may overwrite them
        return out


REDUCTIONS = {"rank_order": rank_order_all_reduce, "tree": tree_all_reduce, "library": library_all_reduce}
EXACT = ("rank_order", "one_shot")


def exact_reduction(kind: str, *, max_numel: int = 0, dtype=None, device=None, group=None):
    """The reduction kv_aligned=1 uses: rank_order (any backend, the CPU's) or one_shot (CUDA, symmetric
    memory; messages of up to max_numel elements of dtype, larger ones in rank order)."""
    if kind == "rank_order":
        return rank_order_all_reduce
    if kind == "one_shot":
        return OneShotReduce(max_numel, dtype, device, group)
    raise ValueError(f"exact reduction must be one of {EXACT}, got {kind!r}")


def size_dependence(reduce, partial: torch.Tensor, rows=(1, 2, 7, 64), group=None) -> dict[int, float]:
    """max |reduce(partial[:m]) - reduce(partial)[:m]| for each m: 0 everywhere means the reduction is
    row-size invariant on this data. Every rank must call it with its own partial."""
    whole = reduce(partial, group)
    out = {}
    for m in rows:
        part = reduce(partial[:m], group)
        out[m] = float((part.float() - whole[:m].float()).abs().max())
    return out
