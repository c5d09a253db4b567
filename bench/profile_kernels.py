"""Per-kernel timings at Llama-3-8B shapes (GPU): Triton kernels vs the torch/cuBLAS/SDPA ops they replace.

    python bench/profile_kernels.py [--ctx 32768]

Prints one line per op: ms, achieved TFLOP/s or GB/s. Used to find where the gap to the roofline is.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from greta import kernels as K
from greta.engine.config import PRESETS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=32768)
    args = ap.parse_args()
    cfg = PRESETS["llama3-8b"]
    dev, dt = "cuda", torch.bfloat16
    h, H, Hkv, D, I = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size
    shapes = {"wqkv": ((H + 2 * Hkv) * D, h), "wo": (h, H * D), "w13": (2 * I, h), "w2": (h, I), "lm_head": (cfg.vocab_size, h)}
    for M in (1, 1024):
        for name, (n, k) in shapes.items():
            x = torch.randn(M, k, device=dev, dtype=dt)
            w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
            t_tr = do_bench(lambda: K.matmul(x, w), return_mode="median")
            t_cb = do_bench(lambda: x @ w.T, return_mode="median")
            flops, nbytes = 2 * M * n * k, 2 * n * k
            print(f"gemm M={M:5d} {name:8s} triton {t_tr:7.3f} ms ({flops / t_tr / 1e9:6.0f} TFLOP/s, {nbytes / t_tr / 1e6:5.0f} GB/s)"
                  f" | cuBLAS {t_cb:7.3f} ms ({flops / t_cb / 1e9:6.0f} TFLOP/s, {nbytes / t_cb / 1e6:5.0f} GB/s)", flush=True)
    S = args.ctx + 1024
    kc = torch.randn(Hkv, S, D, device=dev, dtype=dt)
    vc = torch.randn(Hkv, S, D, device=dev, dtype=dt)
    start = args.ctx - 1024
    q = torch.randn(1024, H, D, device=dev, dtype=dt)
    t_pa = do_bench(lambda: K.prefill_attention(q, kc, vc, start), return_mode="median")
    kk = kc[:, : start + 1024].repeat_interleave(H // Hkv, 0)[None]
    vv = vc[:, : start + 1024].repeat_interleave(H // Hkv, 0)[None]
    mask = torch.arange(start + 1024, device=dev)[None, :] <= torch.arange(start, start + 1024, device=dev)[:, None]
    t_sd = do_bench(lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv, attn_mask=mask), return_mode="median")
    fl = 4 * H * D * 1024 * (start + 512)
    print(f"prefill attention, last 1024-row chunk at ctx {args.ctx}: triton {t_pa:.3f} ms ({fl / t_pa / 1e9:.0f} TFLOP/s)"
          f" | SDPA (expanded KV, mask) {t_sd:.3f} ms ({fl / t_sd / 1e9:.0f} TFLOP/s)", flush=True)
    q1 = torch.randn(1, H, D, device=dev, dtype=dt)
    pos = torch.tensor([args.ctx], device=dev)
    t_da = do_bench(lambda: K.decode_attention(q1, kc, vc, pos), return_mode="median")
    kvb = 2 * Hkv * args.ctx * D * 2
    print(f"decode attention at pos {args.ctx}: triton {t_da:.3f} ms ({kvb / t_da / 1e6:.0f} GB/s of KV)", flush=True)
    x = torch.randn(1024, h, device=dev, dtype=dt)
    wn = torch.ones(h, device=dev, dtype=dt)
    t_n = do_bench(lambda: K.rmsnorm(x, wn, 1e-5), return_mode="median")
    g = torch.randn(1024, 2 * I, device=dev, dtype=dt)
    t_s = do_bench(lambda: K.swiglu(g[:, :I], g[:, I:]), return_mode="median")
    print(f"rmsnorm 1024x{h}: {t_n:.3f} ms; swiglu 1024x{I}: {t_s:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
