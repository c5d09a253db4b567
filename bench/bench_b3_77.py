"""Speed and memory of Greta against the roofline and its peers, in one run on one card.

    python bench/bench_b3_77.py --ctx 4096 32768 131072 --out bench/results
    python bench/bench_b3_77.py --ctx 32768 --peers attention --skip kv1      # a shorter call

Per point (ctx, engine, kv_aligned): prefill_s (one ctx-token prefill), decode_ms_per_token (median over
`--gen` greedy steps after it), peak_allocated_gib (the allocator's peak over both), and the ratios to the
floors set by the ceilings measured at the start of this run:
  prefill_roofline_ratio = prefill_s / (prefill FLOPs / bf16 matmul rate)
  decode_roofline_ratio  = ms per token / (bytes per token / copy bandwidth)
Then, from the same points:
  price_of_exactness  kv1 / kv0 per phase and ctx (Greta's exact path over its fastest one)
  kv0_vs_best_peer    kv0 / the fastest HF engine per phase and ctx (issue 13: within 1.05 or kv0 is not "fastest")
Peers (bench_peers.py; --peers picks them): HF eager, HF generate over a StaticCache, and attention alone
(SDPA cuDNN / flash beside Greta's exact and kv0 prefill attention). A peer that fails is recorded with its
one-line error (`failures`) and the rest still runs.
Writes <out>/bench_<date>_<card>_<time>.json and .md. GPU only (the CPU numbers would mean nothing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench_peers import PEERS, attempt, attention_rows, free, hf_model, sync, time_hf_eager, time_hf_static
from greta.engine.config import PRESETS
from greta.engine.prompt import synthetic_prompt
from greta.engine.runner import Runner
from greta.engine.weights import synthetic
from greta.probe.worker import measure_ceilings
from greta.reports import md

GIB = 2**30
GRETA = {1: "triton", 0: "torch"}  # kv_aligned -> the backend named (kv0 runs its fast path whichever)


def time_engine(model_fn, prompt, gen):
    """(prefill_s, decode ms/token median, peak GiB, facts), all warm: the timed prefill is the second one.
    model_fn() builds a fresh engine (cache included); facts: which SDPA backend ran kv0's prefill attention, whether decode ran from a CUDA graph."""
    torch.cuda.reset_peak_memory_stats()
    m = model_fn()
    m.prefill(prompt)  # warm: kernels compiled, cuDNN plans built for every chunk's shape (steady state)
    m.cache.reset()
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
    attn = getattr(m.ops, "attention", None)
    facts = {"ops": type(m.ops).__name__, "decode_graph": bool(m.graphable),
             **({"prefill_attention_backends": dict(attn.backends), "prefill_attention_merge_check": attn.merge_check,
                 "prefill_attention_notes": list(attn.notes)} if attn is not None and attn.backends else {})}
    del m
    free()
    return prefill_s, 1e3 * statistics.median(steps[1:]), peak, facts  # step 0 includes graph capture


def ratios(points, num: str, den: str) -> list[dict]:
    """Per ctx: time of engine group `num` / time of group `den`, prefill and decode. A group is "kv1",
    "kv0" (Greta's points) or "peer" (the fastest non-Greta point per phase)."""
    def best(ctx, group, key):
        pick = [p[key] for p in points if p["ctx"] == ctx and p.get(key) is not None and
                (p["engine"].startswith("greta") and group == f"kv{p['kv_aligned']}"
                 or not p["engine"].startswith("greta") and group == "peer")]
        return min(pick) if pick else None

    out = []
    for ctx in sorted({p["ctx"] for p in points}):
        row = {"ctx": ctx}
        for phase, key in (("prefill", "prefill_s"), ("decode", "decode_ms_per_token")):
            a, b = best(ctx, num, key), best(ctx, den, key)
            row[phase] = a / b if a is not None and b else None
        if row["prefill"] is not None or row["decode"] is not None:
            out.append(row)
    return out


def _f(x, spec="{:.3f}"):
    return "—" if x is None else spec.format(x)


def render_md(doc) -> str:
    """The run as Markdown; every outside string (engine names, errors, the card) through greta.reports.md."""
    ceil, pts = doc["ceilings"], doc["points"]
    L = [md.heading(1, f"Bench {doc['model']} on {doc['card']}, {doc['date']}"), "",
         md.text(f"Ceilings (this run): bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s. "
                 f"Prefill chunk {doc['chunk']}; decode = median over {doc['gen']} steps. Targets (kv1): prefill ≤ 1.3× floor, "
                 "decode ≤ 1.25× floor, peak ≤ weights + KV + 1 GiB."), "",
         *([md.bold("Incomplete: this file was written before the run ended (cut short, or still running)."), ""]
           if not doc.get("complete", True) else []),
         md.table(["engine", "ctx", "kv_aligned", "prefill s", "× floor", "decode ms/tok", "× floor", "peak GiB",
                   "weights+KV GiB"],
                  [[p["engine"], p["ctx"], "—" if p["kv_aligned"] is None else p["kv_aligned"], _f(p["prefill_s"]),
                    _f(p["prefill_roofline_ratio"], "{:.2f}"), _f(p["decode_ms_per_token"], "{:.2f}"),
                    _f(p["decode_roofline_ratio"], "{:.2f}"), _f(p["peak_allocated_gib"], "{:.2f}"),
                    _f(p["weights_plus_kv_gib"], "{:.2f}")] for p in pts]), ""]
    for title, key in (("Price of exactness: Greta kv1 / kv0 (goal ≤ 1.10 at 32k)", "price_of_exactness"),
                       ("kv0 / the fastest peer (issue 13: ≤ 1.05, or kv0 is not \"fastest\")", "kv0_vs_best_peer")):
        L += [md.heading(2, title), "", md.table(["ctx", "prefill", "decode"],
                                                  [[r["ctx"], _f(r["prefill"]), _f(r["decode"])] for r in doc[key]]), ""]
    if doc["attention"]:
        L += [md.heading(2, "Attention alone (causal, bf16; TFLOP/s over visible pairs)"), "",
              md.table(["kernel", "ctx", "query rows", "ms", "TFLOP/s", "backends", "max |Δ| vs exact"],
                       [[a["kernel"], a["ctx"], f"{a['rows']} (from {a['start']})", _f(a["ms"]), _f(a["tflops"], "{:.0f}"),
                         ", ".join(f"{k}: {v}" for k, v in a.get("backends", {}).items()) or "—",
                         _f(a.get("max_abs_vs_exact"), "{:.2e}")] for a in doc["attention"]]), ""]
    facts = [f"{p['engine']} ctx {p['ctx']}: {p['facts']}" for p in pts if p.get("facts")]
    if facts:
        L += [md.heading(2, "How each Greta point ran"), "", *md.bullets(facts), ""]
    L += [md.heading(2, "Failures"), "", *(md.bullets(f"{f['peer']}: {f['error']}" for f in doc["failures"])
                                           or [md.text("none")])]
    return "\n".join(L) + "\n"


def greta_points(args, cfg, dev, add, failures):
    """Greta kv1 (Triton, exact) and kv0 (the fast path) at each ctx, after a warm-up of both."""
    w = synthetic(cfg, 0, torch.bfloat16, dev)
    kvs = [kv for kv in (1, 0) if f"kv{kv}" not in args.skip]
    for kv in kvs:  # warm-up: compile the Triton kernels, initialise cuBLAS/SDPA outside the timed points
        attempt(f"greta kv{kv} warm-up", failures, time_engine,
                lambda: Runner(cfg, w, max_tokens=1100, kv_aligned=kv, chunk=1024, kv_block=1024, backend=GRETA[kv]),
                synthetic_prompt(1024, cfg.vocab_size, 1).to(dev), 3)
    for ctx in args.ctx:
        prompt = synthetic_prompt(ctx, cfg.vocab_size, 0).to(dev)
        for kv in kvs:
            r = attempt(f"greta kv{kv} ctx {ctx}", failures, time_engine,
                        lambda: Runner(cfg, w, max_tokens=ctx + args.gen, kv_aligned=kv, chunk=args.chunk,
                                       kv_block=1024, backend=GRETA[kv]), prompt, args.gen)
            if r is not None:
                add(f"greta-kv{kv} ({r[3]['ops']})", ctx, kv, *r[:3], facts=r[3])


def hf_points(args, cfg, dev, add, failures, save):
    """The HF peers named in --peers, one random-init model for all of them; save() after each ctx."""
    import transformers

    model = hf_model(cfg)
    ver = transformers.__version__
    for ctx in args.ctx:
        prompt = synthetic_prompt(ctx, cfg.vocab_size, 0).to(dev)
        if "hf-eager" in args.peers:
            r = attempt(f"hf-eager ctx {ctx}", failures, time_hf_eager, model, prompt, args.gen)
            if r is not None:
                add(f"hf-transformers-{ver} (eager loop, sdpa, DynamicCache)", ctx, None, *r[:3],
                    decode_vs_prefill_max_abs=r[3])
        if "hf-static" in args.peers:
            r = attempt(f"hf-static ctx {ctx}", failures, time_hf_static, model, prompt, args.gen)
            if r is not None:
                add(f"hf-transformers-{ver} (generate, StaticCache, compiled decode)", ctx, None, *r)
        save()
    del model
    free()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (rows per forward; params/b3_77.yaml)")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS), help="peers to run (none: --peers)")
    ap.add_argument("--attention-ctx", type=int, nargs="*", default=None,
                    help="ctx for attention alone (default: those of --ctx that are >= 32768)")
    ap.add_argument("--skip", nargs="*", choices=("kv1", "kv0"), default=[], help="Greta modes not to run")
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
    points, failures = [], []

    def add(engine, ctx, kv, prefill_s, dec_ms, peak, **extra):
        pf, df = cfg.prefill_flops(ctx) / rate, cfg.decode_bytes(ctx) / bw * 1e3
        p = {"engine": engine, "ctx": ctx, "kv_aligned": kv, "prefill_s": prefill_s, "decode_ms_per_token": dec_ms,
             "peak_allocated_gib": peak, "prefill_floor_s": pf, "decode_floor_ms": df,
             "prefill_roofline_ratio": prefill_s / pf, "decode_roofline_ratio": dec_ms / df,
             "weights_plus_kv_gib": (cfg.param_count() * 2 + cfg.kv_bytes_per_token() * (ctx + args.gen)) / GIB, **extra}
        points.append(p)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()}), flush=True)

    now = datetime.now(timezone.utc)
    doc = {"card": card, "date": now.strftime("%Y-%m-%d"), "torch": torch.__version__, "ceilings": ceil,
           "model": args.model, "gen": args.gen, "chunk": args.chunk, "args": vars(args), "complete": False,
           "points": points, "attention": [], "failures": failures}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{doc['date']}_{card.replace(' ', '_')}_{now.strftime('%H%M%S')}"

    def save(complete=False):  # after every section: a call cut short by its time limit keeps what ran
        doc.update(complete=complete, price_of_exactness=ratios(points, "kv1", "kv0"),
                   kv0_vs_best_peer=ratios(points, "kv0", "peer"))
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        stem.with_suffix(".md").write_text(render_md(doc))

    greta_points(args, cfg, dev, add, failures)
    free()  # the Greta weights went with greta_points' frame
    save()
    if "attention" in args.peers:
        actx = args.attention_ctx if args.attention_ctx is not None else [c for c in args.ctx if c >= 32768]
        doc["attention"] = attempt("attention", failures, attention_rows, cfg, actx, args.chunk, failures) or []
        save()
    if {"hf-eager", "hf-static"} & set(args.peers):
        attempt("hf", failures, hf_points, args, cfg, dev, add, failures, save)
    save(complete=True)
    print(render_md(doc))


if __name__ == "__main__":
    main()
