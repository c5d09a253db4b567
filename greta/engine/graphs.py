"""The one CUDA/HIP-graph helper: a runner's decode steps captured once per shape and replayed.

    graphs = StepGraphs()
    logits = graphs.run(("batch", rows), step, (tokens, positions, seqs))   # step(*inputs) -> a tensor

Each key (the one-sequence step; a batch step per row count) gets one graph, captured the first time it runs:
the step runs twice eagerly on a side stream with the same inputs (Triton compiles, libraries initialise, the
same cache positions are written), then once under capture. The graph's inputs are static copies that each
run refills; no step may read anything back on the host (a captured value would be the first step's).

All graphs share one memory pool. That is safe here because nothing a graph allocates outlives its replay:
the inputs are allocated outside the capture, the KV cache belongs to the runner, and run() clones the output
before any other graph replays over the same pool memory.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch


class StepGraphs:
    def __init__(self):
        self._graphs: dict[Hashable, tuple] = {}  # key -> (graph, static inputs, static output)
        self._pool = None

    def run(self, key: Hashable, step: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """step(*inputs) replayed from key's graph (captured now if it has none)."""
        if key not in self._graphs:
            self._graphs[key] = self._capture(step, tuple(x.clone() for x in inputs))
        graph, static, out = self._graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return out.clone()  # the next replay overwrites the graph's output buffer

    def captured(self) -> set:
        """The keys that have a graph."""
        return set(self._graphs)

    def _capture(self, step, static: tuple[torch.Tensor, ...]) -> tuple:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step(*static)
        return graph, static, out
