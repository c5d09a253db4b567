"""The tp-invariant mode's decode on one card: wo and w2 with each tree segment in its own programs
(kernels/gemm_tree.py, split) against the tree in one program per tile (before) and the plain K loop.

    python bench/bench_tree_decode.py --ctx 32768 --out bench/results

Per linear at M = 1 (Llama-3-8B wo [4096, 4096] and w2 [4096, 14336], S = 8): ms per call, replayed from a
CUDA graph of --reps calls (as decode runs), and GB/s of weight bytes against the copy ceiling measured here;
the split row is checked bit-identical to the one-program row and to the same row of an M = 512 product.
Whole decode steps: a kv_aligned=1 Runner at --ctx with tree_segments = S, split on and off
(gemm_tree.TREE_SPLIT_M), and the default mode (no tree); ms/token = median of --gen greedy steps after one
prefill, and the split and one-program runs' logits compared bit for bit.
Writes <out>/tree_decode_<date>_<card>_<time>.json and .md. GPU only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from greta.engine.config import PRESETS, tree_segments
from greta.engine.prompt import synthetic_prompt
from greta.engine.runner import Runner
from greta.engine.weights import synthetic
from greta.kernels import gemm_tree
from greta.kernels.gemm import matmul
from greta.probe.worker import measure_ceilings
from greta.reports import md

DEV = "cuda"


def graph_ms(fn, reps: int) -> float:
    """ms per call of fn(), reps calls captured in one CUDA graph and replayed (the median of 5 replays)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)


def linear_rows(cfg, segments: int, reps: int, copy_gbps: float) -> list[dict]:
    rows = []
    for name, (n, k) in (("wo", (cfg.hidden_size, cfg.n_heads * cfg.head_dim)),
                         ("w2", (cfg.hidden_size, cfg.intermediate_size))):
        g = torch.Generator(device=DEV).manual_seed(n + k)
        x = torch.randn(512, k, generator=g, device=DEV).to(torch.bfloat16)
        w = (torch.randn(n, k, generator=g, device=DEV) * k ** -0.5).to(torch.bfloat16)
        x1 = x[7:8].contiguous()
        split = gemm_tree.matmul_tree(x1, w, segments, split=True)
        same = (torch.equal(split, gemm_tree.matmul_tree(x1, w, segments, split=False))
                and torch.equal(split[0], gemm_tree.matmul_tree(x, w, segments)[7]))
        for how, fn in (("plain K loop (default mode)", lambda: matmul(x1, w)),
                        ("tree, one program per tile (before)", lambda: gemm_tree.matmul_tree(x1, w, segments, split=False)),
                        ("tree, a program per segment (split)", lambda: gemm_tree.matmul_tree(x1, w, segments, split=True))):
            ms = graph_ms(fn, reps)
            gbps = n * k * 2 / ms / 1e6
            rows.append({"linear": name, "shape": [n, k], "how": how, "ms": ms, "gbps": gbps,
                         "of_copy": gbps / copy_gbps, "split_bits_equal": same})
    return rows


def decode_ms(cfg, w, prompt, gen: int, segments: int):
    """(ms/token median, the decode logits): one prefill, then gen greedy steps from the CUDA graph."""
    m = Runner(cfg, w, max_tokens=prompt.numel() + gen, kv_aligned=1, chunk=2048, kv_block=1024,
               backend="triton", tree_segments=segments)
    tok = m.prefill(prompt)[0].argmax()
    steps, logits = [], []
    for j in range(gen):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = m.decode(tok, prompt.numel() + j)
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - t0)
        logits.append(out.float().cpu())
        tok = out.argmax()
    del m
    torch.cuda.empty_cache()
    return 1e3 * statistics.median(steps[1:]), torch.stack(logits)


def step_rows(cfg, segments: int, ctx: int, gen: int) -> list[dict]:
    w = synthetic(cfg, 0, torch.bfloat16, DEV)
    prompt = synthetic_prompt(ctx, cfg.vocab_size, 0).to(DEV)
    keep = gemm_tree.TREE_SPLIT_M
    rows, logits = [], {}
    for how, seg, split_m in (("default mode (no tree)", 0, keep), ("tree, one program per tile (before)", segments, 0),
                              ("tree, a program per segment (split)", segments, keep)):
        gemm_tree.TREE_SPLIT_M = split_m
        try:
            ms, logits[how] = decode_ms(cfg, w, prompt, gen, seg)
        finally:
            gemm_tree.TREE_SPLIT_M = keep
        rows.append({"how": how, "ctx": ctx, "decode_ms_per_token": ms})
    same = torch.equal(logits["tree, one program per tile (before)"], logits["tree, a program per segment (split)"])
    for r in rows:
        r["split_logits_equal_unsplit"] = same
    return rows


def render_md(doc) -> str:
    L = [md.heading(1, f"Tree decode (tp-invariant mode) on {doc['card']}, {doc['date']}"), "",
         md.text(f"{doc['model']}, S = {doc['segments']}; ceilings (this run): copy {doc['ceilings']['copy_gbps']:.0f} "
                 f"GB/s. Per linear: M = 1, bf16, ms per call from a CUDA graph of {doc['reps']} calls."), "",
         md.table(["linear", "shape [N, K]", "how", "µs", "GB/s", "of copy", "split bits = one program = prefill row"],
                  [[r["linear"], f"{r['shape'][0]} × {r['shape'][1]}", r["how"], f"{1e3 * r['ms']:.1f}",
                    f"{r['gbps']:.0f}", f"{r['of_copy']:.2f}", r["split_bits_equal"]] for r in doc["linears"]]), ""]
    if doc["steps"]:
        L += [md.heading(2, f"Whole decode steps at ctx {doc['steps'][0]['ctx']} (median of {doc['gen']})"), "",
              md.table(["how", "ms/token", "split logits = one-program logits"],
                       [[r["how"], f"{r['decode_ms_per_token']:.2f}", r["split_logits_equal_unsplit"]]
                        for r in doc["steps"]]), ""]
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--ctx", type=int, default=32768, help="whole decode steps at this context (0: skip them)")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_tree_decode.py: needs a CUDA GPU (CPU timings would mean nothing)")
    cfg = PRESETS[args.model]
    segments = tree_segments(cfg)
    ceilings = measure_ceilings(torch.device(DEV), torch.bfloat16)
    doc = {"card": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "torch": torch.__version__, "model": args.model, "segments": segments, "reps": args.reps, "gen": args.gen,
           "ceilings": ceilings, "linears": linear_rows(cfg, segments, args.reps, ceilings["copy_gbps"]), "steps": []}
    if args.ctx:
        doc["steps"] = step_rows(cfg, segments, args.ctx, args.gen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tree_decode_{doc['date']}_{doc['card'].replace(' ', '_')}_{datetime.now(timezone.utc):%H%M%S}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{stem}.md").write_text(render_md(doc))
    print(render_md(doc))


if __name__ == "__main__":
    main()
