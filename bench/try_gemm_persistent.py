"""The shipped persistent TMA GEMM of kernels/gemm.py (`_matmul_persistent_kernel`: one program per SM walks
output tiles in grouped order, so W tiles stay in L2 and the epilogue of one tile overlaps the next tile's
loads), timed and checked, not a copy of it. Each tile's K loop is the batch-invariant one (acc = dot(x_blk,
w_blk, acc) over BLOCK_K blocks in order); rows are checked bit-identical to the decode tile's. Timed at
M=2048 (the prefill chunk) on the Llama-3-8B layer shapes: `matmul` as shipped (G.PREFILL), the same kernel
launched with other tiles, and cuBLAS, in the same run.

    python bench/try_gemm_persistent.py            # prefill tiles at M=2048
    python bench/try_gemm_persistent.py --decode   # decode tiles at BLOCK_K 64 against the persistent prefill tile
    python bench/try_gemm_persistent.py --decode-shapes   # decode tiles shape by shape
    python bench/try_gemm_persistent.py --decode-tma      # M=1 through the TMA kernel, BLOCK_K up to 256
"""
import torch
import triton
from triton.testing import do_bench

from greta.engine.config import PRESETS
from greta.kernels import gemm as G


def persistent_matmul(x, w, bm, bn, nw, ns, group_m, bk=G.BLOCK_K):
    """The shipped kernel, launched as gemm.matmul launches it, with the tile given instead of G.PREFILL."""
    from triton.tools.tensor_descriptor import TensorDescriptor as TD

    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    G._matmul_persistent_kernel[grid](TD.from_tensor(x, [bm, bk]), TD.from_tensor(w, [bn, bk]),
                                      TD.from_tensor(y, [bm, bn]), M, N, K, NUM_SMS=sms, GROUP_M=group_m,
                                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns,
                                      enable_fp_fusion=False)
    return y


def main():
    c = PRESETS["llama3-8b"]
    h, I = c.hidden_size, c.intermediate_size
    shapes = [(6144, h), (h, h), (2 * I, h), (h, I)]
    ws_ = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes]
    M = 2048
    xs = {k: torch.randn(M, k, device="cuda", dtype=torch.bfloat16) for k in (h, I)}
    fl = 2 * M * sum(n * k for n, k in shapes)

    def rate(f):
        t = sum(do_bench(lambda: f(xs[w.shape[1]], w), return_mode="median") for w in ws_)
        return f"{t:.3f} ms per layer ({fl / t / 1e9:.0f} TFLOP/s)"

    print(f"{torch.cuda.get_device_name()}, M={M}", flush=True)
    same = all(torch.equal(G.matmul(xs[w.shape[1]], w)[i:i + 1], G.matmul(xs[w.shape[1]][i:i + 1], w))
               for w in ws_ for i in (0, 77, 2047))
    print(f"shipped matmul, prefill tile {G.PREFILL}: {rate(G.matmul)}; rows == decode tile: {same}", flush=True)
    print(f"cuBLAS: {rate(lambda x, w: x @ w.T)}", flush=True)
    # the shipped kernel under other tiles (bm, bn, warps, stages, group_m, BLOCK_K); BLOCK_K 128 is not
    # the decode tile's, so its rows need not match: the check says
    for cfg in [(128, 128, 8, 3, 8, 128), (128, 128, 8, 4, 8, 64), (128, 128, 8, 5, 8, 64),
                (128, 256, 8, 3, 8, 64), (128, 256, 8, 4, 8, 64), (256, 128, 8, 3, 8, 64), (128, 256, 8, 3, 16, 64)]:
        try:
            f = lambda x, w: persistent_matmul(x, w, *cfg)  # noqa: E731
            r = rate(f)
            same = all(torch.equal(f(xs[w.shape[1]], w)[i:i + 1], G.matmul(xs[w.shape[1]][i:i + 1], w))
                       for w in ws_ for i in (0, 77, 2047))
            print(f"persistent (bm, bn, warps, stages, group_m, bk)={cfg}: {r}; rows == decode tile: {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"persistent {cfg}: failed {type(e).__name__}: {' '.join(str(e).split())[:200]}", flush=True)


def decode_bk64():
    """Decode tiles (M=1) at BLOCK_K 64, so both tiles share it (the CPU interpreter, and any GPU, then sum the
    same blocks): time per layer and rows == the persistent prefill tile's at BLOCK_K 64."""
    c = PRESETS["llama3-8b"]
    h, I = c.hidden_size, c.intermediate_size
    shapes = [(6144, h), (h, h), (2 * I, h), (h, I)]
    ws_ = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes]
    lm = torch.randn(c.vocab_size, h, device="cuda", dtype=torch.bfloat16) * 0.02
    xs = {k: torch.randn(2048, k, device="cuda", dtype=torch.bfloat16) for k in (h, I)}
    by = 2 * sum(n * k for n, k in shapes)
    ref = [G.matmul(xs[w.shape[1]], w) for w in ws_]  # the shipped prefill path (persistent, BLOCK_K 64)
    default = G.DECODE
    for bk, tile in [(128, default), (64, (64, 32, 4, 4)), (64, (64, 32, 4, 6)), (64, (64, 32, 4, 8)),
                     (64, (64, 64, 4, 4)), (64, (64, 64, 4, 6)), (64, (64, 64, 4, 8)), (64, (64, 16, 4, 8)),
                     (64, (64, 32, 4, 10)), (64, (64, 128, 4, 6))]:
        G.DECODE = tile
        try:
            t = sum(do_bench(lambda: G.matmul(xs[w.shape[1]][:1], w, block_k=bk), return_mode="median") for w in ws_)
            tl_ = do_bench(lambda: G.matmul(xs[h][:1], lm, block_k=bk), return_mode="median")
            same = all(torch.equal(G.matmul(xs[w.shape[1]][j:j + 1], w, block_k=bk), r[j:j + 1])
                       for w, r in zip(ws_, ref) for j in (0, 77, 2047))
            print(f"decode BLOCK_K {bk} tile {tile}: {t:.3f} ms per layer ({by / t / 1e6:.0f} GB/s), lm_head {tl_:.3f} ms; "
                  f"rows == persistent prefill (BLOCK_K 64): {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"decode {bk} {tile}: failed {type(e).__name__}: {' '.join(str(e).split())[:200]}", flush=True)
    G.DECODE = default


def decode_per_shape():
    """Decode tiles (M=1, BLOCK_K 64) shape by shape: the N tile may differ per shape without changing a bit."""
    c = PRESETS["llama3-8b"]
    h, I = c.hidden_size, c.intermediate_size
    shapes = {"qkv": (6144, h), "o": (h, h), "gate_up": (2 * I, h), "down": (h, I), "lm_head": (c.vocab_size, h)}
    default = G.DECODE
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = G.matmul(x, w)
        out = []
        for tile in [(64, 16, 4, 8), (64, 16, 4, 12), (64, 32, 4, 8), (64, 32, 4, 12), (64, 64, 4, 8), (64, 128, 4, 4),
                     (64, 32, 8, 8), (64, 64, 8, 6)]:
            G.DECODE = tile
            try:
                t = do_bench(lambda: G.matmul(x, w), return_mode="median")
                out.append(f"{tile[1:]} {2 * n * k / t / 1e6:.0f}{'' if torch.equal(G.matmul(x, w), ref) else ' (bits differ!)'}")
            except Exception as e:  # noqa: BLE001
                out.append(f"{tile[1:]} failed {type(e).__name__}")
        G.DECODE = default
        print(f"{name} {n}x{k}: GB/s by (BLOCK_N, warps, stages): " + "; ".join(out), flush=True)


def decode_tma():
    """M=1 through the persistent TMA kernel with decode tiles (BLOCK_M 64, so one wgmma shape) and BLOCK_K up to
    256 (wgmma chains the same k16 steps, so the bits should not move: checked against the prefill rows), shape
    by shape, beside the shipped decode tile and cuBLAS; GB/s = the weight's bytes / time."""
    c = PRESETS["llama3-8b"]
    h, I = c.hidden_size, c.intermediate_size
    shapes = {"qkv": (6144, h), "o": (h, h), "gate_up": (2 * I, h), "down": (h, I), "lm_head": (c.vocab_size, h)}
    tiles = [(bn, bk, ns) for bn, bk, ns in [(16, 128, 8), (16, 256, 4), (16, 256, 6), (32, 128, 6), (32, 128, 8),
                                             (32, 256, 3), (32, 256, 4), (64, 128, 4), (64, 256, 3), (16, 512, 3)]]
    totals = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        xs = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
        ref = G.matmul(xs, w)  # prefill rows (persistent, BLOCK_K 64)
        x = xs[:1].clone()
        gbs = lambda t: 2 * n * k / t / 1e6  # noqa: E731
        row = {"shipped": do_bench(lambda: G.matmul(x, w), return_mode="median"),
               "cublas": do_bench(lambda: x @ w.T, return_mode="median")}
        out = [f"shipped {gbs(row['shipped']):.0f}", f"cuBLAS {gbs(row['cublas']):.0f}"]
        for bn, bk, ns in tiles:
            try:
                f = lambda: persistent_matmul(x, w, 64, bn, 4, ns, 1, bk)  # noqa: E731
                t = do_bench(f, return_mode="median")
                row[(bn, bk, ns)] = t
                out.append(f"{(bn, bk, ns)} {gbs(t):.0f}{'' if torch.equal(f(), ref[:1]) else ' (bits differ!)'}")
            except Exception as e:  # noqa: BLE001
                out.append(f"{(bn, bk, ns)} failed {type(e).__name__}: {' '.join(str(e).split())[:80]}")
        for key, t in row.items():
            totals.setdefault(key, {})[name] = t
        print(f"{name} {n}x{k}: GB/s: " + "; ".join(out), flush=True)
    layer = [nm for nm in shapes if nm != "lm_head"]
    by = 2 * sum(shapes[nm][0] * shapes[nm][1] for nm in layer)
    for key, per in totals.items():
        if all(nm in per for nm in layer):
            t = sum(per[nm] for nm in layer)
            print(f"{key}: {t:.4f} ms per layer ({by / t / 1e6:.0f} GB/s); best per shape below", flush=True)
    best = {nm: min((per[nm], key) for key, per in totals.items() if nm in per and key != "cublas")
            for nm in shapes}
    t = sum(best[nm][0] for nm in layer)
    print(f"best tile per shape: {best}; {t:.4f} ms per layer ({by / t / 1e6:.0f} GB/s)", flush=True)


if __name__ == "__main__":
    import sys

    if "--decode-tma" in sys.argv:
        decode_tma()
    elif "--decode" in sys.argv:
        decode_bk64()
    elif "--decode-shapes" in sys.argv:
        decode_per_shape()
    else:
        main()
