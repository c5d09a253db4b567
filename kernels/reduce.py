"""Sum of up to 8 same-shaped buffers (the tensor-parallel ranks' partials, read from peers' memory) added in
the order given, 0 first, in fp32, rounded once to out's dtype: the one-shot exact all-reduce's arithmetic
(greta.engine.dist.OneShotReduce). Its torch reference, sum_in_order_ref, is the same additions in the same
order, so both give the bits of greta.engine.dist.rank_order_all_reduce. Elementwise."""
import torch
import triton
import triton.language as tl

BLOCK = 2048
NUM_WARPS = 4
MAX_BUFFERS = 8


@triton.jit
def _sum_kernel(Y, X0, X1, X2, X3, X4, X5, X6, X7, n, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.load(X0 + offs, mask=ok, other=0.0).to(tl.float32)
    # unrolled at compile time (COUNT is constexpr): the adds run in buffer order, never reassociated
    if COUNT > 1:
        acc += tl.load(X1 + offs, mask=ok, other=0.0).to(tl.float32)
    if COUNT > 2:
        acc += tl.load(X2 + offs, mask=ok, other=0.0).to(tl.float32)
    if COUNT > 3:
        acc += tl.load(X3 + offs, mask=ok, other=0.0).to(tl.float32)
    if COUNT > 4:
        acc += tl.load(X4 + offs, mask=ok, other=0.0).to(tl.float32)
    if COUNT > 5:
        acc += tl.load(X5 + offs, mask=ok, other=0.0).to(tl.float32)
    if COUNT > 6:
        acc += tl.load(X6 + offs, mask=ok, other=0.0).to(tl.float32)
    if COUNT > 7:
        acc += tl.load(X7 + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


def sum_in_order(buffers: list[torch.Tensor], out: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """out <- buffers[0] + buffers[1] + ... in fp32, in that order, rounded once. All contiguous, out's
    shape; the buffers may live in peers' memory (symmetric memory), out is local."""
    count = len(buffers)
    assert 1 <= count <= MAX_BUFFERS, count
    assert all(b.shape == out.shape and b.is_contiguous() for b in buffers) and out.is_contiguous()
    n = out.numel()
    padded = list(buffers) + [buffers[0]] * (MAX_BUFFERS - count)  # unused pointers, never read
    _sum_kernel[(triton.cdiv(n, block),)](out, *padded, n, COUNT=count, BLOCK=block, num_warps=NUM_WARPS)
    return out
