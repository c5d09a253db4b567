"""Experiment: a TMA (tensor-descriptor) variant of the batch-invariant GEMM, and warp specialisation.
Same BLOCK_K and K order as kernels/gemm.py; checks that its rows are bit-identical to the decode tile's
and times it at M=1024 on the five Llama-3-8B weight shapes.

    python bench/try_gemm_tma.py
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from greta.engine.config import PRESETS
from greta.kernels import gemm as G


@triton.jit
def _tma_kernel(x_desc, w_desc, y_desc, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                WS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WS):
        x = x_desc.load([pid_m * BLOCK_M, k0])
        w = w_desc.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(x, w.T, acc)
    y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y_desc.dtype))


def tma_matmul(x, w, bm, bn, bk, nw, ns, ws):
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    xd = TensorDescriptor.from_tensor(x, [bm, bk])
    wd = TensorDescriptor.from_tensor(w, [bn, bk])
    yd = TensorDescriptor.from_tensor(y, [bm, bn])
    _tma_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](xd, wd, yd, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, WS=ws,
                                                          num_warps=nw, num_stages=ns, enable_fp_fusion=False)
    return y


def decode_variants(shapes, ws_):
    """TMA decode tiles at M=1: time per layer and rows == the prefill tile's rows."""
    xs = {k: torch.randn(1024, k, device="cuda", dtype=torch.bfloat16) for k in {k for _, k in shapes}}
    ref = [G.matmul(xs[w.shape[1]], w) for w in ws_]
    t = sum(do_bench(lambda: G.matmul(xs[w.shape[1]][:1], w), return_mode="median") for w in ws_)
    print(f"current decode tile (pointer loads): {t:.3f} ms per layer", flush=True)
    for cfg in [(64, 32, 128, 4, 4, False), (64, 32, 128, 4, 6, False), (64, 64, 128, 4, 6, False),
                (64, 32, 128, 4, 8, False), (64, 16, 128, 4, 8, False), (64, 64, 128, 4, 4, False)]:
        try:
            t = sum(do_bench(lambda: tma_matmul(xs[w.shape[1]][:1], w, *cfg), return_mode="median") for w in ws_)
            same = all(torch.equal(tma_matmul(xs[w.shape[1]][j:j + 1], w, *cfg), r[j:j + 1])
                       for w, r in zip(ws_, ref) for j in (0, 300))
            print(f"TMA decode {cfg}: {t:.3f} ms per layer; rows == prefill tile: {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"TMA decode {cfg}: failed {type(e).__name__}: {' '.join(str(e).split())[:160]}", flush=True)


def main():
    c = PRESETS["llama3-8b"]
    h, I = c.hidden_size, c.intermediate_size
    shapes = [(6144, h), (h, h), (2 * I, h), (h, I)]
    ws_ = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes]
    xs = {k: torch.randn(1024, k, device="cuda", dtype=torch.bfloat16) for k in (h, I)}
    decode_variants(shapes, ws_)
    fl = 2 * 1024 * sum(n * k for n, k in shapes)
    t = sum(do_bench(lambda: G.matmul(xs[w.shape[1]], w), return_mode="median") for w in ws_)
    print(f"current prefill tile: {t:.3f} ms per layer ({fl / t / 1e9:.0f} TFLOP/s)", flush=True)
    t = sum(do_bench(lambda: xs[w.shape[1]] @ w.T, return_mode="median") for w in ws_)
    print(f"cuBLAS: {t:.3f} ms per layer ({fl / t / 1e9:.0f} TFLOP/s)", flush=True)
    for cfg in [(128, 128, 128, 8, 3, False), (128, 128, 64, 8, 4, False), (128, 256, 64, 8, 3, False),
                (128, 128, 128, 8, 3, True), (128, 128, 64, 8, 4, True), (128, 256, 64, 8, 3, True),
                (128, 256, 128, 8, 2, False)]:
        try:
            t = sum(do_bench(lambda: tma_matmul(xs[w.shape[1]], w, *cfg), return_mode="median") for w in ws_)
            same = all(torch.equal(tma_matmul(xs[w.shape[1]], w, *cfg)[i:i + 1], G.matmul(xs[w.shape[1]][i:i + 1], w))
                       for w in ws_ for i in (0, 77, 1000)) if cfg[2] == G.BLOCK_K else "n/a (other BLOCK_K)"
            print(f"TMA {cfg}: {t:.3f} ms per layer ({fl / t / 1e9:.0f} TFLOP/s); rows == decode tile: {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"TMA {cfg}: failed {type(e).__name__}: {' '.join(str(e).split())[:160]}", flush=True)


if __name__ == "__main__":
    main()
