"""Speed and memory of Greta against the roofline and HF transformers, in one run on one card.

    python bench/bench_b3_77.py --ctx 4096 32768 131072 --out bench/results

Per point (ctx, engine, kv_aligned): prefill_s (one ctx-token prefill), decode_ms_per_token (median over
`--gen` greedy steps after it), peak_allocated_gib (the allocator's peak over both), and the ratios to the
floors set by the ceilings measured at the start of this run:
  prefill_roofline_ratio = prefill_s / (prefill FLOPs / bf16 matmul rate)
  decode_roofline_ratio  = ms per token / (bytes per token / copy bandwidth)
Writes <out>/bench_<date>_<card>.json and .md. GPU only (the CPU numbers would mean nothing).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from greta.engine.config import PRESETS
from greta.engine.runner import Runner
from greta.engine.prompt import synthetic_prompt
from greta.engine.weights import synthetic
from greta.probe.worker import measure_ceilings

GIB = 2**30


def sync():
    torch.cuda.synchronize()


def time_engine(model_fn, prompt, gen):
    """(prefill_s, decode ms/token median, peak GiB). model_fn() builds a fresh engine (cache included)."""
    torch.cuda.reset_peak_memory_stats()
    m = model_fn()
    sync()
    t0 = time.perf_counter()
    logits = m.prefill(prompt)
    sync()
    prefill_s = time.perf_counter() - t0
    tok = logits[0].argmax()
    steps = []
    for j in range(gen):
        sync()
        t0 = time.perf_counter()
        tok = m.decode(tok, prompt.numel() + j).argmax()
        sync()
        steps.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / GIB
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return prefill_s, 1e3 * statistics.median(steps[1:]), peak  # step 0 includes graph capture


def time_hf(cfg, prompt, gen):
    """HF transformers LlamaForCausalLM (sdpa, DynamicCache), random init: prefill, decode, and its own
    decode-vs-prefill drift (max |Δlogit| over the first 8 decode steps)."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")},
                         torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    ids = prompt[None]
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync()
        prefill_s = time.perf_counter() - t0
        cache, tok = out.past_key_values, out.logits[0, -1].argmax()
        steps, toks, dec_logits = [], [int(tok)], []
        for _ in range(gen):
            sync()
            t0 = time.perf_counter()
            out = model(tok.view(1, 1), past_key_values=cache, use_cache=True)
            sync()
            steps.append(time.perf_counter() - t0)
            dec_logits.append(out.logits[0, -1].float())
            tok = out.logits[0, -1].argmax()
            toks.append(int(tok))
        peak = torch.cuda.max_memory_allocated() / GIB
        span = min(8, gen)  # teacher-forced: decode step j was fed toks[j]
        seq = torch.cat([prompt, torch.tensor(toks[:span], device=prompt.device)])[None]
        ref = model(seq, use_cache=False, logits_to_keep=span).logits[0].float()
        drift = float((torch.stack(dec_logits[:span]) - ref).abs().max())
    del model, cache, out
    gc.collect()
    torch.cuda.empty_cache()
    return prefill_s, 1e3 * statistics.median(steps[1:]), peak, drift, transformers.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (rows per forward; params/b3_77.yaml)")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench: needs a GPU (the CPU numbers would mean nothing)")
    cfg = PRESETS[args.model]
    dev = torch.device("cuda", 0)
    card = torch.cuda.get_device_name(dev)
    ceil = measure_ceilings(dev, torch.bfloat16)
    rate, bw = ceil["matmul_tflops"] * 1e12, ceil["copy_gbps"] * 1e9
    print(f"{card}: matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s", flush=True)
    w = synthetic(cfg, 0, torch.bfloat16, dev)
    points = []

    def add(engine, ctx, kv, prefill_s, dec_ms, peak, **extra):
        pf = cfg.prefill_flops(ctx) / rate
        df = cfg.decode_bytes(ctx) / bw * 1e3
        p = {"engine": engine, "ctx": ctx, "kv_aligned": kv, "prefill_s": prefill_s, "decode_ms_per_token": dec_ms,
             "peak_allocated_gib": peak, "prefill_floor_s": pf, "decode_floor_ms": df,
             "prefill_roofline_ratio": prefill_s / pf, "decode_roofline_ratio": dec_ms / df,
             "weights_plus_kv_gib": (cfg.param_count() * 2 + cfg.kv_bytes_per_token() * (ctx + args.gen)) / GIB, **extra}
        points.append(p)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()}), flush=True)

    # warm-up: compile the Triton kernels and initialise cuBLAS/SDPA outside the timed points
    for kv, backend in ((1, "triton"), (0, "torch")):
        time_engine(lambda: Runner(cfg, w, max_tokens=1100, kv_aligned=kv, chunk=1024, kv_block=1024, backend=backend),
                    synthetic_prompt(1024, cfg.vocab_size, 1).to(dev), 3)
    for ctx in args.ctx:
        prompt = synthetic_prompt(ctx, cfg.vocab_size, 0).to(dev)
        for kv, backend in ((1, "triton"), (0, "torch")):
            try:
                r = time_engine(lambda: Runner(cfg, w, max_tokens=ctx + args.gen, kv_aligned=kv, chunk=args.chunk,
                                              kv_block=1024, backend=backend), prompt, args.gen)
                add(f"greta-{backend}", ctx, kv, *r)
            except torch.OutOfMemoryError as e:
                print(f"greta kv{kv} ctx {ctx}: OOM ({str(e).splitlines()[0]})", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    if not args.no_hf:
        del w
        gc.collect()
        torch.cuda.empty_cache()
        for ctx in args.ctx:
            prompt = synthetic_prompt(ctx, cfg.vocab_size, 0).to(dev)
            try:
                pre, dec, peak, drift, ver = time_hf(cfg, prompt, args.gen)
                add(f"hf-transformers-{ver}", ctx, None, pre, dec, peak, decode_vs_prefill_max_abs=drift)
            except ImportError as e:
                print(f"HF transformers not importable: {e}", flush=True)
                break
            except torch.OutOfMemoryError as e:
                print(f"HF ctx {ctx}: OOM ({str(e).splitlines()[0]})", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{day}_{card.replace(' ', '_')}_{datetime.now(timezone.utc).strftime('%H%M%S')}"
    doc = {"card": card, "date": day, "torch": torch.__version__, "ceilings": ceil, "model": args.model,
           "gen": args.gen, "chunk": args.chunk, "points": points}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Bench {args.model} on {card}, {day}", "",
             f"Ceilings (this run): bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s. "
             f"Prefill chunk {args.chunk}. Targets: prefill ≤ 1.3× floor, decode ≤ 1.25× floor, peak ≤ weights + KV + 1 GiB.", "",
             "| engine | ctx | kv_aligned | prefill s | × floor | decode ms/tok | × floor | peak GiB | weights+KV GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        kv = "—" if p["kv_aligned"] is None else p["kv_aligned"]
        lines.append(f"| {p['engine']} | {p['ctx']} | {kv} | {p['prefill_s']:.3f} | {p['prefill_roofline_ratio']:.2f} | "
                     f"{p['decode_ms_per_token']:.2f} | {p['decode_roofline_ratio']:.2f} | {p['peak_allocated_gib']:.2f} | "
                     f"{p['weights_plus_kv_gib']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
