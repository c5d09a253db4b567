"""Batch decode throughput against the roofline floor, and exactness per point, on one card.

    python bench/bench_batch.py --batch 1 2 4 8 16 32 --ctx 4096 32768 --kv 1 0 --out bench/results

Per ctx and kv_aligned, one Runner holds a KV slab for each of the largest batch's requests (as many as
fit: the largest B that fits is used, larger ones are reported as not fitting). Every request's prompt is
prefilled once, sequence by sequence (prefill tokens/s), then for each B the first B requests are decoded
together for --gen greedy steps (decode ms/step: the median over the steps after the first, which includes
the CUDA graph capture; both kv modes replay their step from CUDA graphs, one per row count: kv1 the exact
batch decode (TritonBatchOps), kv0 batched flash-decoding (FastBatchOps); tokens/s = B / step). The floor per
step is the weights read once plus each sequence's KV up to its position, over the copy bandwidth measured at
the start of this run.

Exactness per point (--check requests): each checked request's logits over its first --span decode steps at
every B are compared, bit for bit, with (a) the request decoded alone (a batch of one, teacher-forced on the
largest batch's tokens) and (c) its teacher-forced prefill reference. kv_aligned=1 must give exact=True at
every point; kv_aligned=0 reports the measured max |Δ|.

Prompts are synthetic, all requests ctx tokens long unless --lengths uniform (drawn in [ctx/2, ctx], seeded)
so that "ctx" is the context of every sequence in the floor. Writes <out>/bench_batch_<date>_<card>_<time>.json
and .md. To fit a 10-minute call: fewer --batch values, --gen 16, --check 2, one --ctx per call.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from greta.engine.config import kv_bytes
from greta.engine.requests import decode_alone, decode_together, prefill_all, reference
from greta.engine.runner import Runner
from greta.engine.config import PRESETS
from greta.engine.prompt import synthetic_prompt
from greta.engine.weights import synthetic
from greta.probe.worker import measure_ceilings
from greta.record.batch import step_floor_bytes

GIB = 2**30


def fitting_batch(cfg, want: int, tokens: int, kv_block: int, headroom_gib: float) -> int:
    """The largest batch <= want whose slabs fit the free device memory, less headroom for activations."""
    free = torch.cuda.mem_get_info()[0] - headroom_gib * GIB
    per_seq = kv_bytes(cfg, 1, tokens, kv_block, 2)
    return max(0, min(want, int(free // per_seq)))


def lengths_for(ctx: int, n: int, how: str) -> list[int]:
    if how == "full":
        return [ctx] * n
    return np.random.default_rng(0).integers(ctx // 2, ctx, endpoint=True, size=n).tolist()


def timed_decode(br, lengths, firsts, gens, keep, weight_bytes, kvb):
    """decode_together with a clock per step: (tokens, kept logits, ms per step, floor bytes per step)."""
    ms, floors, last = [], [], [time.perf_counter()]

    def on_step(j, rows):
        torch.cuda.synchronize()
        now = time.perf_counter()
        ms.append((now - last[0]) * 1e3)
        floors.append(step_floor_bytes(weight_bytes, kvb, [n + j for n in lengths[:rows]]))
        last[0] = time.perf_counter()

    tokens, kept = decode_together(br, lengths, firsts, gens, keep, on_step)
    return tokens, kept, ms, floors


def exactness(br, prompts, lengths, runs, tokens, span, check: int) -> dict:
    """Per B: worst max |Δ| of the checked requests' in-batch logits against alone (a) and reference (c)."""
    out = {B: {"exact": True, "max_abs_diff": 0.0} for B in runs}
    for b in range(min(check, len(prompts))):
        alone = torch.stack(decode_alone(br, b, lengths[b], tokens[b], span))
        ref = reference(br, b, prompts[b], tokens[b], span)[1:]
        for B, kept in runs.items():
            if b >= B:
                continue
            x = torch.stack(kept[b][:span])
            d = max(float((x.double() - alone.double()).abs().max()), float((x.double() - ref.double()).abs().max()))
            out[B]["exact"] &= bool(torch.equal(x, alone) and torch.equal(x, ref))
            out[B]["max_abs_diff"] = max(out[B]["max_abs_diff"], d)
    return out


def bench_point(cfg, w, ctx, kv, args, bw, weight_bytes) -> list[dict]:
    """Every B at one (ctx, kv_aligned)."""
    tokens_per_seq = ctx + args.gen
    nmax = fitting_batch(cfg, max(args.batch), tokens_per_seq + args.chunk, 1024, args.headroom_gib)
    sizes = [B for B in sorted(args.batch) if B <= nmax]
    skipped = [{"ctx": ctx, "kv_aligned": kv, "batch": B, "fits": False} for B in sorted(args.batch) if B > nmax]
    if not sizes:
        return skipped
    lengths = lengths_for(ctx, sizes[-1], args.lengths)
    prompts = [synthetic_prompt(n, cfg.vocab_size, 100 + b).cuda() for b, n in enumerate(lengths)]
    br = Runner(cfg, w, n_seqs=sizes[-1], max_tokens=tokens_per_seq, kv_aligned=kv, chunk=args.chunk,
                kv_block=1024, backend="triton" if kv else "torch")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    firsts = prefill_all(br, prompts)
    torch.cuda.synchronize()
    prefill_tps = sum(lengths) / (time.perf_counter() - t0)
    kvb = cfg.kv_bytes_per_token(2)
    runs, points, tokens = {}, [], None
    for B in sizes:
        toks, kept, ms, floors = timed_decode(br, lengths[:B], firsts[:B], [args.gen] * B, args.span, weight_bytes, kvb)
        runs[B] = kept
        tokens = toks if B == sizes[-1] else tokens
        step_ms = statistics.median(ms[1:] or ms)
        floor_ms = statistics.median(floors) / bw * 1e3
        points.append({"ctx": ctx, "kv_aligned": kv, "batch": B, "fits": True, "batch_ops": type(br.batch_ops).__name__,
                       "decode_graph": bool(br.graphable), "decode_ms_per_step": step_ms,
                       "decode_tokens_per_s": B / step_ms * 1e3, "floor_ms_per_step": floor_ms,
                       "floor_tokens_per_s": B / floor_ms * 1e3, "fraction_of_floor": floor_ms / step_ms,
                       "prefill_tokens_per_s": prefill_tps, "first_step_ms": ms[0]})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in points[-1].items()}), flush=True)
    ex = exactness(br, prompts, lengths, runs, tokens, args.span, args.check)
    for p in points:
        p.update(exact=ex[p["batch"]]["exact"], max_abs_diff=ex[p["batch"]]["max_abs_diff"], checked=min(args.check, p["batch"]))
    del br
    gc.collect()
    torch.cuda.empty_cache()
    return points + skipped


def markdown(doc) -> str:
    L = [f"# Batch bench {doc['model']} on {doc['card']}, {doc['date']}", "",
         f"Ceilings (this run): copy {doc['ceilings']['copy_gbps']:.0f} GB/s. Decode {doc['gen']} steps per point; "
         f"exactness over {doc['span']} steps of {doc['check']} requests (alone and teacher-forced reference).", "",
         "| ctx | kv | B | decode ms/step | tokens/s | floor tokens/s | % of floor | prefill tok/s | exact | max abs diff |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["points"]:
        if not p["fits"]:
            L.append(f"| {p['ctx']} | {p['kv_aligned']} | {p['batch']} | does not fit | | | | | | |")
            continue
        L.append(f"| {p['ctx']} | {p['kv_aligned']} | {p['batch']} | {p['decode_ms_per_step']:.2f} | "
                 f"{p['decode_tokens_per_s']:.0f} | {p['floor_tokens_per_s']:.0f} | {100 * p['fraction_of_floor']:.0f}% | "
                 f"{p['prefill_tokens_per_s']:.0f} | {p['exact']} | {p['max_abs_diff']:.3g} |")
    ran = sorted({(p["kv_aligned"], p["batch_ops"], p["decode_graph"]) for p in doc["points"] if p["fits"]})
    L += ["", "Decode steps: " + ", ".join(f"kv{kv} {ops}" + (" (CUDA graphs)" if g else " (eager)") for kv, ops, g in ran)]
    price = _price(doc["points"])
    if price:
        L += ["", "Price of exactness (kv1 ms/step ÷ kv0 ms/step): " + ", ".join(f"ctx {c} B {b}: {r:.2f}" for (c, b), r in price.items())]
    return "\n".join(L) + "\n"


def _price(points) -> dict:
    by = {(p["ctx"], p["batch"], p["kv_aligned"]): p for p in points if p["fits"]}
    return {(c, b): by[(c, b, 1)]["decode_ms_per_step"] / by[(c, b, 0)]["decode_ms_per_step"]
            for (c, b, kv) in by if kv == 1 and (c, b, 0) in by}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096])
    ap.add_argument("--kv", type=int, nargs="+", default=[1, 0], choices=[0, 1])
    ap.add_argument("--gen", type=int, default=32, help="decode steps timed per point")
    ap.add_argument("--span", type=int, default=4, help="decode steps compared per checked request")
    ap.add_argument("--check", type=int, default=4, help="requests checked for exactness per point")
    ap.add_argument("--lengths", choices=["full", "uniform"], default="full")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--headroom-gib", type=float, default=6.0, help="free memory kept for activations")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench: needs a GPU (the CPU numbers would mean nothing)")
    if args.span > args.gen:
        raise SystemExit(f"bench: --span {args.span} exceeds --gen {args.gen}")
    cfg, dev = PRESETS[args.model], torch.device("cuda", 0)
    card = torch.cuda.get_device_name(dev)
    ceil = measure_ceilings(dev, torch.bfloat16)
    print(f"{card}: copy {ceil['copy_gbps']:.0f} GB/s", flush=True)
    w = synthetic(cfg, 0, torch.bfloat16, dev)
    weight_bytes = sum(t.nbytes for k, t in w.items() if k != "embed" or cfg.tie_embeddings)
    points = []
    for ctx in args.ctx:
        for kv in args.kv:
            points += bench_point(cfg, w, ctx, kv, args, ceil["copy_gbps"] * 1e9, weight_bytes)
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_batch_{day}_{card.replace(' ', '_')}_{datetime.now(timezone.utc).strftime('%H%M%S')}"
    doc = {"card": card, "date": day, "torch": torch.__version__, "ceilings": ceil, "model": args.model,
           "gen": args.gen, "span": args.span, "check": args.check, "lengths": args.lengths, "chunk": args.chunk,
           "points": points}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
