"""A request's logits three ways, and the one greedy loop, over the one runner (greta/engine/runner.py).

    r = Runner(cfg, w, n_seqs=3, max_tokens=ctx + gen, kv_aligned=1, chunk=256, kv_block=1024)
    firsts = prefill_all(r, prompts)                                        # each prompt into its slab
    tokens, kept = decode_together(r, lengths, firsts, gens, keep)          # (b) one batch step per position
    alone = decode_alone(r, b, lengths[b], tokens[b], steps)                # (a) a batch of one
    ref = reference(r, b, prompts[b], tokens[b], steps)                     # (c) the teacher-forced prefill

Prefill runs sequence by sequence (chunks of one sequence through the single-sequence backend over that
sequence's slab), so a request's prefill is the single-sequence prefill, bit for bit. A batch decode step runs
one row per live sequence through greta/engine/ops/batch.py: the row-wise ops once over all rows, attention
per sequence over its own slab; a sequence that has finished is left out of the next step. With kv_aligned=1
every backend is batch-invariant, so a request's logits are the same alone, in any batch, and in its
teacher-forced prefill reference; with kv_aligned=0 they drift (measured by the batch probe). B3.77's single
request is greedy() over the runner's one-sequence decode, and reference() on sequence 0.
"""
from __future__ import annotations

from typing import Callable

import torch

from greta.engine.runner import Runner

Step = Callable[[list[int], list[int], list[int]], torch.Tensor]  # (tokens, positions, sequences) -> logits [rows, V]


def greedy(step: Step, lengths: list[int], firsts: list[int], gens: list[int], keep: int,
           on_step=None) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """The one greedy loop: sequence b decoded for gens[b] steps from position lengths[b], its first token
    firsts[b]; each step one call of step() with the live sequences' rows (a sequence that is done leaves).
    Returns per sequence its tokens (gens[b] + 1: the first, then one per step) and the logits of its first
    `keep` decode steps. on_step(j, rows) after each step."""
    n = len(lengths)
    tokens = [[int(f)] for f in firsts]
    kept: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for j in range(max(gens, default=0)):
        live = [b for b in range(n) if j < gens[b]]
        logits = step([tokens[b][-1] for b in live], [lengths[b] + j for b in live], live)
        nxt = logits.argmax(-1).tolist()  # the one host sync per step: reading the sampled tokens
        for r, b in enumerate(live):
            tokens[b].append(int(nxt[r]))
            if j < keep:
                kept[b].append(logits[r])
        if on_step:
            on_step(j, len(live))
    return tokens, kept


def one_sequence(r: Runner) -> Step:
    """greedy()'s step for a single request: the runner's one-sequence decode of sequence 0."""
    return lambda tokens, positions, seqs: r.decode(tokens[0], positions[0])[None]


def prefill_all(r: Runner, prompts: list[torch.Tensor], progress=None) -> list[torch.Tensor]:
    """Every sequence's prompt into its slab, one after the other; each one's logits at its last position."""
    firsts = []
    for b, prompt in enumerate(prompts):
        firsts.append(r.prefill(prompt, seq=b)[0])
        if progress:
            progress(b + 1, len(prompts))
    return firsts


def decode_together(r: Runner, lengths: list[int], firsts: list[torch.Tensor], gens: list[int],
                    keep: int, on_step=None) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """(b): greedy decode of every sequence in one batch (greedy() over the runner's batch step), sequence b's
    first token the argmax of firsts[b]."""
    return greedy(r.decode_batch, lengths, [int(f.argmax()) for f in firsts], gens, keep, on_step)


def decode_alone(r: Runner, b: int, length: int, tokens: list[int], steps: int) -> list[torch.Tensor]:
    """(a): sequence b decoded alone (a batch of one), teacher-forced on its tokens from the batch run (so
    its steps see the same inputs); logits of its first `steps` decode steps. Its slab must hold its prompt
    (positions written here are rewritten in order, so leftovers of the batch run are never read)."""
    return [r.decode_batch([tokens[j]], [length + j], [b])[0] for j in range(steps)]


def reference(r: Runner, b: int, prompt: torch.Tensor, tokens: list[int], steps: int, progress=None) -> torch.Tensor:
    """(c): the teacher-forced prefill of prompt + tokens[:steps] into sequence b's (reset) slab; logits at
    the prompt's last position and the `steps` decode positions after it: [steps + 1, V]."""
    r.cache.reset(b)
    n = prompt.numel()
    seq = torch.cat([prompt, torch.tensor(tokens[:steps], device=prompt.device, dtype=prompt.dtype)])
    return r.prefill(seq, keep=list(range(n - 1, n + steps)), progress=progress, seq=b)
