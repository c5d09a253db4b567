"""The batch probe's record: what greta.probe.runner.run_probe writes when params.probe is batch, from what its
phases returned (greta/probe/batch_worker.py) or up to the fault that stopped them. The same files as a B3.77
record (docs/RECORD.md), with metrics.json holding the per-request table and batch_logits.npz the logits."""
from __future__ import annotations

import numpy as np

from greta.record import store as record
from greta.record.batch import (LOGITS_FILE, batch_metrics, batch_verdict, logits_arrays, request_row,
                                throughput)
from greta.reports.batch_report import render_batch_report


def _throughput(perf, results) -> dict:
    ceilings = results.get("ceilings")
    steps = (results.get("decode") or {}).get("steps") or []
    fig = throughput(perf["prefill"].get("wall_s"), (results.get("prefill") or {}).get("prefill_tokens", 0), steps,
                     ceilings and ceilings["copy_gbps"])
    return {"available": bool(ceilings and steps), "ceilings": ceilings, **fig}


def finish_batch(rec, params, perf, results, vram_summary, sampler, failure):
    """Metrics, verdict, throughput and report of a batch probe run: everything measured up to any fault."""
    load = results.get("load", {})
    rec.meta["batch"] = load.get("batch")
    metrics, failed_phase = None, None
    if "reference" in results:
        r = results["reference"]
        rows = [request_row(b, r["lengths"][b], r["gens"][b], r["alone"][b], r["in_batch"][b], r["reference"][b])
                for b in range(len(r["lengths"]))]
        metrics = batch_metrics(rows)
        rec.write_npz(LOGITS_FILE, **logits_arrays(r["alone"], r["in_batch"], r["reference"]),
                      lengths=np.array(r["lengths"]), gens=np.array(r["gens"]))
        verdict, reason = batch_verdict(metrics, params.kv_aligned)
    else:
        verdict, failed_phase, payload = failure or ("FAIL_ERROR", None, {"error": "no reference logits"})
        reason = f"{failed_phase}: {payload.get('error', '')}"
    tokens = (results.get("reference") or results.get("decode") or results.get("prefill") or {}).get("tokens")
    perf["roofline"] = _throughput(perf, results)
    verdict_rec = record.verdict_record(params, verdict, reason, failed_phase, metrics, tokens)
    report = render_batch_report(params.to_dict(), rec.finish_meta(load), perf, metrics, vram_summary, verdict_rec)
    rec.finish(load=load, perf=perf, metrics=metrics, vram_summary=vram_summary, samples=sampler.samples,
               verdict=verdict_rec, report=report)
