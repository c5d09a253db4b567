"""The tensor-parallel reduction on the CPU with gloo: rank order is exact for any message size, the
library all_reduce is not from 3 ranks up (the negative control), and 2 ranks are exact either way."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from greta.engine.dist import REDUCTIONS, size_dependence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(1000 + rank)
        partial = (torch.randn(256, 512, generator=g) * 4).to(torch.bfloat16)
        res = {name: size_dependence(fn, partial, rows=(1, 2, 7, 64, 200)) for name, fn in REDUCTIONS.items()}
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def measured(request) -> tuple[int, dict]:
    """(world, {reduction: {rows: max |delta|}}) from one gloo group of `world` processes."""
    world = request.param
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return world, queue.get()


def test_rank_order_reduction_is_exact_for_every_message_size(measured):
    world, res = measured
    assert set(res["rank_order"].values()) == {0.0}, (world, res)


def test_library_all_reduce_depends_on_message_size_from_3_ranks(measured):
    """The negative control: gloo's all_reduce at 4 ranks changes a row's bits with the message size
    (measured here: up to 0.25 in bf16), so the check above can fail; at 2 ranks one addition is exact."""
    world, res = measured
    if world == 2:
        assert set(res["library"].values()) == {0.0}, res
    else:
        assert max(res["library"].values()) > 0, res
