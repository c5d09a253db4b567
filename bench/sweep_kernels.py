"""GEMM tile sweep at Llama-3-8B shapes (GPU): decode tiles (M <= 64) that share BLOCK_K with the prefill
tile, each checked bit-identical to it. The attention sweep is bench/sweep_attention.py.

    python bench/sweep_kernels.py
"""
from __future__ import annotations

import torch
from triton.testing import do_bench

from greta.engine.config import PRESETS
from greta.kernels import gemm as G

# decode tiles (M <= 64); the prefill tile stays as in kernels/gemm.py, so BLOCK_K is fixed
GEMM = [(64, 32, 4, 4), (64, 16, 4, 4), (64, 32, 4, 6), (64, 64, 4, 4), (64, 16, 4, 6), (64, 32, 4, 3),
        (64, 16, 4, 8), (64, 32, 4, 8), (64, 64, 4, 6), (64, 64, 4, 8), (64, 128, 4, 4), (64, 32, 8, 4), (64, 64, 8, 6)]


def main():
    cfg = PRESETS["llama3-8b"]
    dev, dt = "cuda", torch.bfloat16
    h, H, Hkv, D, I = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size
    shapes = [((H + 2 * Hkv) * D, h), (h, H * D), (2 * I, h), (h, I)]
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for n, k in shapes]
    lm = torch.randn(cfg.vocab_size, h, device=dev, dtype=dt) * 0.02
    xs = {M: {k: torch.randn(M, k, device=dev, dtype=dt) for k in (h, I)} for M in (1, 1024)}
    print("gemm decode tile (bm,bn,warps,stages): decode per layer (M=1) | lm_head | rows == prefill tile", flush=True)
    prefill_rows = {i: G.matmul(xs[1024][w.shape[1]], w) for i, w in enumerate(ws)}
    default = G.DECODE
    for tile in GEMM:
        G.DECODE = tile
        try:
            t = sum(do_bench(lambda: G.matmul(xs[1][w.shape[1]], w), return_mode="median") for w in ws)
            tl = do_bench(lambda: G.matmul(xs[1][h], lm), return_mode="median")
            same = all(torch.equal(G.matmul(xs[1024][w.shape[1]][j:j + 1], w), prefill_rows[i][j:j + 1])
                       for i, w in enumerate(ws) for j in (0, 300))
            print(f"  {tile}: {t:.3f} ms ({2 * sum(n * k for n, k in shapes) / t / 1e6:.0f} GB/s) | {tl:.3f} ms | {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  {tile}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
    G.DECODE = default


if __name__ == "__main__":
    main()
