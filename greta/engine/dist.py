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
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_order_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of x over the group's ranks, added in rank order in fp32: bit-identical per element whatever the
    number of rows reduced together. Returns a new tensor in x's dtype."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    total = parts[0].float()
    for p in parts[1:]:
        total += p.float()
    return total.to(x.dtype)


def library_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """The backend's own all_reduce (NCCL, RCCL, gloo): fastest, but its order of additions may change with
    the message size. Returns a new tensor."""
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


REDUCTIONS = {"rank_order": rank_order_all_reduce, "library": library_all_reduce}


def size_dependence(reduce, partial: torch.Tensor, rows=(1, 2, 7, 64), group=None) -> dict[int, float]:
    """max |reduce(partial[:m]) - reduce(partial)[:m]| for each m: 0 everywhere means the reduction is
    row-size invariant on this data. Every rank must call it with its own partial."""
    whole = reduce(partial, group)
    out = {}
    for m in rows:
        part = reduce(partial[:m], group)
        out[m] = float((part.float() - whole[:m].float()).abs().max())
    return out
