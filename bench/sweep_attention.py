"""Attention sweep (GPU), Llama-3-8B shapes: BLOCK_KV, SPLIT_KV, the prefill launch (BLOCK_M, warps,
stages, TMA loads of K/V) and decode's num_stages.

Each prefill launch must give rows bit-identical to the decode launch (pointer loads, BLOCK_M 64, 4 warps)
with the same BLOCK_KV and SPLIT_KV: checked at several positions of the last 32k chunk. Then whole-model
prefill and decode at 32k (kv_aligned=1, chunk 2048): the current settings and the fastest bit-identical ones.

    python bench/sweep_attention.py                      # BLOCK_KV 64, the splits and launches below
    python bench/sweep_attention.py --block-kv 64 128    # BLOCK_KV (part of a row's definition: both paths
                                                         # use it), SPLIT_KV 1024 and 2048
"""
from __future__ import annotations

import sys

import torch
from triton.testing import do_bench

from greta.engine.config import PRESETS
from greta.kernels import attention as A

SPLITS = [512, 1024, 2048, 4096]
PREFILL = [(64, 4, 3, True), (64, 4, 2, True), (128, 8, 3, True), (64, 4, 3, False)]
DECODE_STAGES = [2, 3, 4]
CURRENT = {"split": A.SPLIT_KV, "launch": A.PREFILL, "decode_stages": A.NUM_STAGES}  # before the sweep


def sweep(ctx=32768, T=1024):
    cfg = PRESETS["llama3-8b"]
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    kc = torch.randn(Hkv, ctx + 1024, D, device=dev, dtype=dt, generator=g)
    vc = torch.randn(Hkv, ctx + 1024, D, device=dev, dtype=dt, generator=g)
    start = ctx - T
    q = torch.randn(T, H, D, device=dev, dtype=dt, generator=g)
    fl = 4 * H * D * T * (start + T / 2)
    rows = [0, 1, 63, 64, 500, 777, T - 1]
    best = {}
    for split in SPLITS:
        A.SPLIT_KV = split
        dec = torch.cat([A.decode_attention(q[t:t + 1], kc, vc, start + t) for t in rows])
        best_dec = None
        for ns in DECODE_STAGES:
            A.NUM_STAGES = ns
            td = {c: do_bench(lambda: A.decode_attention(q[-1:], kc, vc, c - 1), return_mode="median")
                  for c in (4096, ctx)}
            print(f"split {split}, decode stages {ns}: decode @4k {td[4096]:.4f} ms, @32k {td[ctx]:.4f} ms", flush=True)
            if best_dec is None or td[ctx] < best_dec[1]:
                best_dec = (ns, td[ctx])
        A.NUM_STAGES = 2
        for launch in PREFILL:
            A.PREFILL = launch
            try:
                o = A.prefill_attention(q, kc, vc, start)
                same = torch.equal(o[rows], dec)
                tp = do_bench(lambda: A.prefill_attention(q, kc, vc, start), return_mode="median")
                print(f"  split {split} prefill {launch}: last chunk @32k {tp:.3f} ms ({fl / tp / 1e9:.0f} TFLOP/s);"
                      f" rows == decode: {same}", flush=True)
                score = tp * 32 + best_dec[1] * 64  # ~ one 32k prefill's attention + 64 decode steps' worth
                if same and (not best or score < best["score"]):
                    best = {"score": score, "split": split, "launch": launch, "decode_stages": best_dec[0]}
            except Exception as e:  # noqa: BLE001
                print(f"  split {split} prefill {launch}: failed {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                      flush=True)
    return best


def model_runs(best):
    sys.path.insert(0, "bench")
    from bench_b3_77 import time_engine

    from greta.engine.runner import Runner
    from greta.engine.prompt import synthetic_prompt
    from greta.engine.weights import synthetic

    cfg = PRESETS["llama3-8b"]
    dev = torch.device("cuda", 0)
    w = synthetic(cfg, 0, torch.bfloat16, dev)
    ctx = 32768
    prompt = synthetic_prompt(ctx, cfg.vocab_size, 0).to(dev)
    runs = [("current", CURRENT, 2048)]
    if best and {k: best[k] for k in CURRENT} != CURRENT:
        runs += [("best", best, 2048)]
    for name, s, chunk in runs:
        A.SPLIT_KV, A.PREFILL, A.NUM_STAGES = s["split"], s["launch"], s["decode_stages"]
        time_engine(lambda: Runner(cfg, w, max_tokens=2100, kv_aligned=1, chunk=chunk, kv_block=1024,
                                  backend="triton"), prompt[:2048], 3)  # compile
        for rep in range(2):
            pre, dec, peak, _ = time_engine(lambda: Runner(cfg, w, max_tokens=ctx + 32, kv_aligned=1, chunk=chunk,
                                                       kv_block=1024, backend="triton"), prompt, 32)
            print(f"model 32k {name} {s} chunk {chunk}: prefill {pre:.3f} s, decode {dec:.2f} ms/token, "
                  f"peak {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    if "--block-kv" in sys.argv:
        SPLITS = [1024, 2048]
        PREFILL = [(64, 4, 3, True), (128, 8, 3, True), (64, 4, 2, True), (128, 8, 2, True)]
        DECODE_STAGES = [2, 3]
        found = []
        for bkv in [int(x) for x in sys.argv[sys.argv.index("--block-kv") + 1:]]:
            A.BLOCK_KV = bkv
            print(f"== BLOCK_KV {bkv}", flush=True)
            found.append((bkv, sweep()))
        print("fastest bit-identical per BLOCK_KV:", found, flush=True)
        sys.exit(0)
    b = sweep()
    print("fastest bit-identical:", b, flush=True)
    model_runs(b)
