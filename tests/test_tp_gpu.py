"""Tensor parallelism on GPUs (skipped without them): the one-shot reduction over symmetric memory gives the
bits of all_gather + rank-order sum for every message size, on every rank; and at tp=4, kv_aligned=1 on the
Triton kernels (decode replayed from a CUDA graph holding the collectives), decode reproduces a full-tile
teacher-forced prefill bit for bit, while NCCL's own all_reduce in both paths (the negative control) does
not. The model: llama3-70b's layer shapes (hidden 8192, 64 heads, 8 KV heads), 2 layers, a 32000 vocab.

    python -m pytest -q tests/test_tp_gpu.py      # on a 4-GPU host (a 2-GPU host runs the tp=2 half)
"""
from __future__ import annotations

import pytest
import torch

from greta.engine.config import ModelConfig
from greta.engine.launch import finish, init_from_env, spawn

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 2, reason="needs 2+ GPUs")

CFG = ModelConfig(name="70b-shape-2l", vocab_size=32000, hidden_size=8192, n_layers=2, n_heads=64, n_kv_heads=8,
                  head_dim=128, intermediate_size=28672, rope_theta=500000.0, rms_eps=1e-5)
CHUNK, CTX, CHECK = 2048, 2048, 4
ROWS = (1, 2, 7, 64, 2048)


# A rank would inherit TRITON_INTERPRET=1 when the kernel tests ran first in this pytest: unset before the
# interpreter starts (greta.kernels reads it on first import), so the GPU runs compiled kernels.
COMPILED = {"TRITON_INTERPRET": None}


def _reductions_body() -> dict:
    from greta.engine import dist as gdist

    tp, device = init_from_env("cuda", timeout_s=120)
    try:
        g = torch.Generator(device=device).manual_seed(7 + tp.rank)
        x = (torch.randn(max(ROWS), CFG.hidden_size, generator=g, device=device) * 4).to(torch.bfloat16)
        one_shot = gdist.OneShotReduce(x.numel(), x.dtype, device)
        out = {}
        for m in ROWS:
            a, b = one_shot(x[:m]), gdist.rank_order_all_reduce(x[:m])
            out[m] = (bool(torch.equal(a, b)), a.float().sum().item())
        whole = one_shot(x)
        out["rows_invariant"] = all(torch.equal(one_shot(x[:m]), whole[:m]) for m in ROWS)
        return out
    finally:
        finish()


def _model_body(exact: str, perturb: str) -> dict:
    from greta.engine.prompt import synthetic_prompt
    from greta.engine.runner import Runner
    from greta.engine.tp import synthetic_shard

    tp, device = init_from_env("cuda", timeout_s=120, exact=exact)
    try:
        w = synthetic_shard(CFG, 0, torch.bfloat16, device, tp.rank, tp.world)
        m = Runner(CFG, w, max_tokens=CTX + CHECK, kv_aligned=1, chunk=CHUNK, kv_block=1024, backend="triton",
                   perturb=perturb, tp=tp)
        prompt = synthetic_prompt(CTX, CFG.vocab_size, 0).to(device)
        fed, dec = [m.prefill(prompt)[0].argmax()], []
        for j in range(CHECK):
            dec.append(m.decode(fed[-1], CTX + j))
            fed.append(dec[-1].argmax())
        dec = torch.stack(dec)
        ref = m.teacher_forced(prompt, fed[:CHECK])
        return {"exact": bool(torch.equal(dec, ref)), "max_abs_diff": float((dec - ref).abs().max()),
                "graphed": bool(m._graphs.captured()), "logits": dec.cpu()}
    finally:
        finish()


@pytest.mark.parametrize("world", [w for w in (2, 4) if w <= max(GPUS, 2)])
def test_one_shot_reduction_is_rank_order_bits_for_every_size(world):
    if world > GPUS:
        pytest.skip(f"needs {world} GPUs")
    ranks = spawn(_reductions_body, world, timeout_s=300, env=COMPILED)
    for r in ranks:
        assert r["rows_invariant"] and all(r[m][0] for m in ROWS), r
    assert all(r[m][1] == ranks[0][m][1] for r in ranks for m in ROWS)  # every rank the same sums


@pytest.mark.parametrize("exact", ["one_shot", "rank_order"])
def test_tp4_decode_equals_full_tile_prefill(exact):
    if GPUS < 4:
        pytest.skip("needs 4 GPUs")
    ranks = spawn(_model_body, 4, args=(exact, "none"), timeout_s=400, env=COMPILED)
    for r in ranks:
        assert r["graphed"] and r["exact"], (exact, r["max_abs_diff"])
        assert torch.equal(r["logits"], ranks[0]["logits"])


def test_tp4_nccl_all_reduce_breaks_decode():
    """The negative control: NCCL's all_reduce sums decode's 1-row message in another order than the same
    row of a 2048-row prefill chunk (the issue: up to 0.25 in bf16 at 4 ranks), so the check above can fail."""
    if GPUS < 4:
        pytest.skip("needs 4 GPUs")
    ranks = spawn(_model_body, 4, args=("one_shot", "tp_library_reduce"), timeout_s=400, env=COMPILED)
    assert not ranks[0]["exact"] and ranks[0]["max_abs_diff"] > 0, ranks[0]["max_abs_diff"]
