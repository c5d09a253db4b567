"""Is a GEMM row's result the same under two tile configs that share BLOCK_K (same K loop, same MMA k-steps)?
If so, decode (M=1) may use a small-M tile with many more programs and stay bit-identical to prefill.

    python bench/check_gemm_tiles.py
"""
import torch
from triton.testing import do_bench

from greta.engine.config import PRESETS
from greta.kernels import gemm as G

PAIRS = [((128, 128, 64, 8, 3), (64, 64, 64, 4, 4)), ((128, 128, 128, 8, 3), (64, 64, 128, 4, 4)),
         ((128, 128, 64, 8, 3), (64, 32, 64, 4, 4)), ((128, 128, 128, 8, 3), (64, 32, 128, 4, 4))]


def run(x, w, cfg):
    bm, bn, bk, nw, ns = cfg
    G.PREFILL = G.DECODE = (bm, bn, nw, ns)
    return G.matmul(x, w, block_k=bk)


def main():
    c = PRESETS["llama3-8b"]
    h, I = c.hidden_size, c.intermediate_size
    shapes = {"wqkv": (6144, h), "wo": (h, h), "w13": (2 * I, h), "w2": (h, I), "lm_head": (c.vocab_size, h)}
    for big, small in PAIRS:
        equal, t_small = True, 0.0
        for name, (n, k) in shapes.items():
            for seed in range(3):
                g = torch.Generator(device="cuda").manual_seed(seed)
                x = torch.randn(1024, k, device="cuda", dtype=torch.bfloat16, generator=g)
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
                ref = run(x, w, big)
                for i in (0, 5, 127, 1000):
                    equal &= torch.equal(run(x[i:i + 1], w, small), ref[i:i + 1])
            if name != "lm_head":
                x1 = x[:1]
                t_small += do_bench(lambda: run(x1, w, small), return_mode="median")
        print(f"prefill {big} vs decode {small}: rows bit-identical: {equal}; decode per layer {t_small:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
