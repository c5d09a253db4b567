"""The tensor-parallel reductions on one multi-GPU host: are they exact, and how fast are they?

    python bench/bench_allreduce.py --world 4 --out $OUT/allreduce.json

Spawns `world` ranks (greta.engine.launch.spawn: torchrun's environment, NVLink multicast off). Each rank
holds a seeded [2048, hidden] bf16 partial (hidden 8192: llama3-70b). For each reduction:
  nccl          dist.all_reduce (NCCL picks its algorithm by message size)
  gather_add    dist.all_gather, then the sum in rank order in fp32 (greta.engine.dist.rank_order_all_reduce)
  one_shot      greta.engine.dist.OneShotReduce: symmetric memory, barrier, one kernel adds the peers'
                buffers in rank order (kernels/reduce.py), barrier
  torch_symm    torch.ops.symm_mem.one_shot_all_reduce, for reference (its order is torch's business)
(a) exactness: rows [:M] reduced alone vs the same rows of the 2048-row reduction, M in --rows (equal bits:
    "rows_identical"), every rank's result the same bits ("ranks_identical"), and whether the variant's
    bits equal gather_add's ("equals_gather_add": one_shot must);
(b) time per call at M=1 and M=2048: eager (CUDA events around each call) and replayed from a CUDA graph
    that holds --graph-calls calls (replay time / calls), the median over --iters, the slowest rank's.
A variant that raises is recorded as failed with its one-line error; the others still run. Writes the JSON
to --out and a Markdown table beside it (.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from greta.engine import dist as gdist  # noqa: E402
from greta.engine.launch import finish, init_from_env, spawn  # noqa: E402

VARIANTS = ("nccl", "gather_add", "one_shot", "torch_symm")


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:240]}"


def make_variant(name: str, rows: int, hidden: int, device):
    """The reduction `name` as reduce(x) -> a new tensor."""
    if name == "nccl":
        return lambda x: gdist.library_all_reduce(x)
    if name == "gather_add":
        return lambda x: gdist.rank_order_all_reduce(x)
    if name == "one_shot":
        return gdist.OneShotReduce(rows * hidden, torch.bfloat16, device)
    if name == "torch_symm":
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(rows * hidden, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(buf, dist.group.WORLD.group_name)

        def reduce(x):
            n = x.numel()
            buf[:n].copy_(x.reshape(-1))
            out = torch.ops.symm_mem.one_shot_all_reduce(buf[:n], "sum", dist.group.WORLD.group_name)
            return out.view(x.shape)
        return reduce
    raise ValueError(name)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.int16).cpu().numpy().tobytes()).hexdigest()[:16]


def exactness(reduce, partial, rows, reference) -> dict:
    """Row-count invariance of reduce on this rank's partial, and its digest (compared across ranks)."""
    whole = reduce(partial)
    out = {"digest": digest(whole), "rows_identical": {}, "max_abs_diff": {}}
    for m in rows:
        part = reduce(partial[:m])
        out["rows_identical"][m] = bool(torch.equal(part, whole[:m]))
        out["max_abs_diff"][m] = float((part.float() - whole[:m].float()).abs().max())
    if reference is not None:
        out["equals_gather_add"] = bool(torch.equal(whole, reference))
    return out


def time_eager(reduce, x, iters: int) -> float:
    """Median µs of one call, CUDA events around each."""
    times = []
    for _ in range(iters):
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        reduce(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def time_graph(reduce, x, iters: int, calls: int) -> float:
    """Median µs per call of a CUDA graph holding `calls` calls (each feeding the next, as layers do)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        reduce(x)  # warm-up outside capture (communicators, kernels)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(calls):
            y = reduce(y)  # grows by about world per call: 4**20 is far inside bf16's range
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def run_variant(name, opts, partial, reference, device) -> dict:
    """One variant's exactness and timings on this rank; any error recorded, not raised."""
    res: dict = {}
    try:
        reduce = make_variant(name, opts["max_rows"], opts["hidden"], device)
        res["exact"] = exactness(reduce, partial, opts["rows"], reference)
        for m in opts["time_rows"]:
            res[f"eager_us_M{m}"] = time_eager(reduce, partial[:m], opts["iters"])
            res[f"graph_us_M{m}"] = time_graph(reduce, partial[:m].clone(), opts["iters"], opts["graph_calls"])
    except Exception as e:  # noqa: BLE001 - recorded, the other variants still run
        res["failed"] = one_line(e)
    return res


def rank_body(opts: dict) -> dict:
    group, device = init_from_env("cuda", timeout_s=opts["collective_timeout_s"])
    try:
        g = torch.Generator(device=device).manual_seed(1000 + group.rank)
        partial = (torch.randn(opts["max_rows"], opts["hidden"], generator=g, device=device) * 4).to(torch.bfloat16)
        reference = gdist.rank_order_all_reduce(partial)
        out = {"device": torch.cuda.get_device_name(device)}
        for name in opts["variants"]:
            out[name] = run_variant(name, opts, partial, reference, device)
            dist.barrier()
        return out
    finally:
        finish()


def merge(ranks: list[dict], opts: dict) -> dict:
    """Every rank's results -> one row per variant: exactness on rank 0 and across ranks, slowest rank's times."""
    out = {}
    for name in opts["variants"]:
        per = [r[name] for r in ranks]
        failed = [f"rank {i}: {p['failed']}" for i, p in enumerate(per) if "failed" in p]
        if failed:
            out[name] = {"failed": failed[0]}
            continue
        ex = per[0]["exact"]
        row = {"rows_identical": ex["rows_identical"], "max_abs_diff": ex["max_abs_diff"],
               "all_rows_identical": all(all(p["exact"]["rows_identical"].values()) for p in per),
               "ranks_identical": len({p["exact"]["digest"] for p in per}) == 1,
               "equals_gather_add": all(p["exact"].get("equals_gather_add", False) for p in per)}
        for k in per[0]:
            if k.endswith(tuple(f"M{m}" for m in opts["time_rows"])):
                row[k] = max(p[k] for p in per)
        out[name] = row
    return out


def markdown(doc: dict) -> str:
    t = doc["opts"]["time_rows"]
    head = ["variant", "exact for every M", "ranks identical", "= gather+add", "max abs Δ"]
    head += [f"{kind} M={m} µs" for m in t for kind in ("eager", "graph")]
    lines = [f"# Tensor-parallel reductions: {doc['world']} × {doc['device']}, {doc['date']}", "",
             f"hidden {doc['opts']['hidden']} bf16; rows {doc['opts']['rows']} reduced alone vs inside "
             f"{doc['opts']['max_rows']}; times: median over {doc['opts']['iters']}, slowest rank; graph: "
             f"{doc['opts']['graph_calls']} chained calls per replay. torch {doc['torch']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in doc["results"].items():
        if "failed" in r:
            lines.append(f"| {name} | failed: {r['failed'].replace('|', '/')} |" + " |" * (len(head) - 2))
            continue
        cells = [name, "yes" if r["all_rows_identical"] else "**no**", "yes" if r["ranks_identical"] else "**no**",
                 "yes" if r["equals_gather_add"] else "no", f"{max(r['max_abs_diff'].values()):.3g}"]
        cells += [f"{r.get(f'{kind}_us_M{m}', float('nan')):.1f}" for m in t for kind in ("eager", "graph")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 7, 64, 2048])
    ap.add_argument("--time-rows", type=int, nargs="+", default=[1, 2048])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--graph-calls", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--timeout-s", type=float, default=540.0, help="every rank is stopped after this")
    ap.add_argument("--out", default="bench/results/allreduce.json")
    a = ap.parse_args()
    if torch.cuda.device_count() < a.world:
        raise SystemExit(f"bench_allreduce: --world {a.world} needs {a.world} GPUs, this host has {torch.cuda.device_count()}")
    opts = {"hidden": a.hidden, "rows": a.rows, "max_rows": max(a.rows), "time_rows": a.time_rows, "iters": a.iters,
            "graph_calls": a.graph_calls, "variants": a.variants, "collective_timeout_s": min(120.0, a.timeout_s)}
    ranks = spawn(rank_body, a.world, args=(opts,), timeout_s=a.timeout_s)
    doc = {"world": a.world, "device": ranks[0]["device"], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())), "opts": opts,
           "results": merge(ranks, opts)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
