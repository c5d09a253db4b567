"""Tile sweep for the Triton kernels at Llama-3-8B shapes (GPU). Each config is ONE config for both paths
(prefill M=1024 and decode M=1), as batch invariance requires; attention configs are checked bit-exact
(decode row == prefill row) before they are timed.

    python bench/sweep_kernels.py
"""
from __future__ import annotations

import torch
from triton.testing import do_bench

from greta.config import PRESETS
from greta.kernels import attention as A
from greta.kernels import gemm as G

GEMM = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 3)]
ATTN = [(64, 64, 512, 4, 2), (128, 64, 512, 8, 2), (128, 128, 512, 8, 2), (128, 64, 512, 8, 3),
        (64, 128, 512, 4, 2), (128, 128, 1024, 8, 2), (64, 64, 256, 4, 3), (128, 64, 256, 8, 3)]


def main():
    cfg = PRESETS["llama3-8b"]
    dev, dt = "cuda", torch.bfloat16
    h, H, Hkv, D, I = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size
    shapes = [((H + 2 * Hkv) * D, h), (h, H * D), (2 * I, h), (h, I)]
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for n, k in shapes]
    lm = torch.randn(cfg.vocab_size, h, device=dev, dtype=dt) * 0.02
    xs = {M: {k: torch.randn(M, k, device=dev, dtype=dt) for k in (h, I)} for M in (1, 1024)}
    print("gemm (bm,bn,bk,warps,stages): prefill per layer (M=1024) | decode per layer (M=1) | lm_head M=1 | rows equal", flush=True)
    for bm, bn, bk, nw, ns in GEMM:
        G.PREFILL = G.DECODE = (bm, bn, nw, ns)
        kw = dict(block_k=bk)
        try:
            t = {M: sum(do_bench(lambda: G.matmul(xs[M][w.shape[1]], w, **kw), return_mode="median") for w in ws) for M in (1, 1024)}
            tl = do_bench(lambda: G.matmul(xs[1][h], lm, **kw), return_mode="median")
            x = xs[1024][h]
            same = torch.equal(G.matmul(x[5:6], ws[0], **kw), G.matmul(x, ws[0], **kw)[5:6])
            fl = 2 * 1024 * sum(n * k for n, k in shapes)
            print(f"  {(bm, bn, bk, nw, ns)}: {t[1024]:.3f} ms ({fl / t[1024] / 1e9:.0f} TFLOP/s) | {t[1]:.3f} ms "
                  f"({2 * sum(n * k for n, k in shapes) / t[1] / 1e6:.0f} GB/s) | {tl:.3f} ms | {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  {(bm, bn, bk, nw, ns)}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
    ctx = 32768
    S = ctx + 1024
    kc = torch.randn(Hkv, S, D, device=dev, dtype=dt)
    vc = torch.randn(Hkv, S, D, device=dev, dtype=dt)
    start = ctx - 1024
    q = torch.randn(1024, H, D, device=dev, dtype=dt)
    pos = torch.tensor([ctx - 1], device=dev)
    fl = 4 * H * D * 1024 * (start + 512)
    print("attention (bm,bkv,split,warps,stages): prefill last chunk @32k | decode @32k | decode==prefill row", flush=True)
    for bm, bkv, sp, nw, ns in ATTN:
        A.NUM_WARPS, A.NUM_STAGES = nw, ns
        kw = dict(block_m=bm, block_kv=bkv, split_kv=sp)
        try:
            tp = do_bench(lambda: A.prefill_attention(q, kc, vc, start, **kw), return_mode="median")
            td = do_bench(lambda: A.decode_attention(q[-1:], kc, vc, pos, **kw), return_mode="median")
            same = torch.equal(A.decode_attention(q[-1:], kc, vc, pos, **kw), A.prefill_attention(q, kc, vc, start, **kw)[-1:])
            print(f"  {(bm, bkv, sp, nw, ns)}: {tp:.3f} ms ({fl / tp / 1e9:.0f} TFLOP/s) | {td:.3f} ms | {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  {(bm, bkv, sp, nw, ns)}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)


if __name__ == "__main__":
    main()
