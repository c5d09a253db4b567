"""The same prompt at several tensor-parallel degrees, every logit compared with tp=1's (docs/TP.md).

    case = DegreeCase(cfg, seed=0, dtype="bfloat16", ctx=70, steps=4, chunk=64, kv_block=32, tree_segments=8)
    result = compare_degrees(case, degrees=(1, 2, 4))   # {"degrees": {2: {...}, 4: {...}}, "bit_identical": ...}

At each degree the ranks (gloo on the CPU, one process each, tp=1 too, so every degree runs with the same
threads) make the synthetic weights' shard, prefill the prompt's first ctx tokens keeping every position's
logits, then decode the next `steps` prompt tokens one at a time (teacher-forced: the same tokens at every
degree). Rank 0's logits are compared with tp=1's: per path (prefill, decode) the largest |Δ|, the first
position whose logits differ (None: none does) and whether every bit is equal. The probe kind of issue 23
calls this; tests/test_tp_invariance.py holds it to its negative control (tree_segments=0, the plain
per-rank K order, differs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from greta.engine.config import ModelConfig


@dataclass(frozen=True)
class DegreeCase:
    """One run to repeat at every degree: a model config and its synthetic weights' seed, the prompt (seeded
    synthetic ids), the engine's settings. tree_segments: S of the tp-invariant tree; 0 is today's order."""
    cfg: ModelConfig
    seed: int
    dtype: str
    ctx: int
    steps: int
    chunk: int
    kv_block: int
    tree_segments: int = 0
    backend: str = "torch"
    perturb: str = "none"
    prompt_seed: int = 3
    threads: int = 1


def run_case(case: DegreeCase, tp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits at positions 0..ctx-1, decode logits at ctx..ctx+steps-1), fp32, in this process: one
    device (tp None) or this rank of the group tp (every rank must call it)."""
    from greta.engine.prompt import synthetic_prompt
    from greta.engine.runner import Runner
    from greta.engine.tp import synthetic_shard
    from greta.engine.weights import synthetic

    dtype = getattr(torch, case.dtype)  # bfloat16 | float16 | float32, as params spell them
    w = synthetic_shard(case.cfg, case.seed, dtype, "cpu", tp.rank, tp.world) if tp else \
        synthetic(case.cfg, case.seed, dtype, "cpu")
    prompt = synthetic_prompt(case.ctx + case.steps, case.cfg.vocab_size, case.prompt_seed)
    m = Runner(case.cfg, w, max_tokens=case.ctx + case.steps, kv_aligned=1, chunk=case.chunk,
               kv_block=case.kv_block, perturb=case.perturb, backend=case.backend, tp=tp,
               tree_segments=case.tree_segments)
    pre = m.prefill(prompt[:case.ctx], keep=list(range(case.ctx)))
    dec = torch.stack([m.decode(prompt[p], p) for p in range(case.ctx, case.ctx + case.steps)])
    return pre, dec


def _rank_body(cases: list[DegreeCase]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from greta.engine.launch import finish, init_from_env

    tp, _ = init_from_env("cpu", timeout_s=120)
    try:
        torch.set_num_threads(cases[0].threads)
        return [run_case(c, tp if tp.world > 1 else None) for c in cases]
    finally:
        finish()


def degree_logits(cases: list[DegreeCase], world: int, timeout_s: float = 600.0,
                  env: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """run_case of each case at tp=world (gloo ranks, one process each; world 1 too): rank 0's logits, after
    checking that every rank returned the same bits (each gathers the full logits)."""
    from greta.engine.launch import spawn

    ranks = spawn(_rank_body, world, args=(cases,), timeout_s=timeout_s, env=env)
    for r, got in enumerate(ranks[1:], 1):
        for case, mine, first in zip(cases, got, ranks[0]):
            if not all(torch.equal(a, b) for a, b in zip(mine, first)):
                raise RuntimeError(f"rank {r} returned other logits than rank 0 at tp={world} ({case.dtype})")
    return ranks[0]


def diff_positions(ref: torch.Tensor, got: torch.Tensor, first_pos: int) -> dict:
    """One path's logits [positions, V] against the reference's: max |Δ|, the first differing absolute
    position (rows start at first_pos; None: none differs), bit_identical. NaN counts as a difference."""
    if ref.shape != got.shape:
        raise ValueError(f"logits of shape {tuple(got.shape)} cannot be compared with {tuple(ref.shape)}")
    same = (ref.view(torch.int32) == got.view(torch.int32)).all(dim=1)  # bits, so -0.0 vs 0.0 and NaN count
    differ = (~same).nonzero().flatten()
    delta = (got - ref).abs()
    return {"max_abs_diff": float(delta.nan_to_num(nan=float("inf")).max()) if delta.numel() else 0.0,
            "first_diff_pos": int(differ[0]) + first_pos if differ.numel() else None,
            "bit_identical": not differ.numel()}


def compare_degrees(case: DegreeCase, degrees=(1, 2, 4), timeout_s: float = 600.0, env: dict | None = None,
                    logits: dict | None = None) -> dict:
    """case at each degree (the first is the reference, normally 1) -> {"reference_tp", "degrees": {tp:
    {"prefill": diff, "decode": diff}}, "bit_identical"}; logits: {tp: (prefill, decode)} already computed
    (degree_logits), the rest are run here."""
    logits = dict(logits or {})
    for world in degrees:
        if world not in logits:
            logits[world] = degree_logits([case], world, timeout_s, env)[0]
    ref_tp, (ref_pre, ref_dec) = degrees[0], logits[degrees[0]]
    out = {}
    for world in degrees[1:]:
        pre, dec = logits[world]
        out[world] = {"prefill": diff_positions(ref_pre, pre, 0), "decode": diff_positions(ref_dec, dec, case.ctx)}
    same = all(d[p]["bit_identical"] for d in out.values() for p in ("prefill", "decode"))
    return {"reference_tp": ref_tp, "degrees": out, "bit_identical": same}

