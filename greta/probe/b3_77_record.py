"""B3.77's record: what greta.probe.runner.run_probe writes for probe b3_77, from what its phases returned
(greta/probe/b3_77_worker.py) or up to the fault that stopped them (docs/RECORD.md): metrics.json compares
decode with the prefill reference over the span, logits.npz holds both."""
from __future__ import annotations

import numpy as np

from greta.probe.continuation import continuation
from greta.record import store as record
from greta.record.metrics import compare, equivalence_verdict
from greta.reports.run_report import render_report


def finish_b3_77(rec, params, perf, results, vram_summary, sampler, failure):
    """Metrics, verdict, roofline and report of a B3.77 run: everything measured up to any fault."""
    load = results.get("load", {})
    metrics = None
    if "reference" in results:
        ref = results["reference"]
        sources = ["prefill"] + ["decode"] * (params.span - 1)
        metrics = compare(ref["decode_logits"], ref["reference_logits"], ref["tokens"], ref["positions"], sources)
        rec.write_npz("logits.npz", decode=ref["decode_logits"], reference=ref["reference_logits"],
                      tokens=np.array(ref["tokens"]), positions=np.array(ref["positions"]))
        verdict, reason = equivalence_verdict(metrics, params.kv_aligned, params.thresholds.to_dict(), params.engine)
        failed_phase = None
        text = continuation(params, ref)
        if text is not None:
            rec.meta["continuation"] = text
    else:
        verdict, failed_phase, payload = failure or ("FAIL_ERROR", None, {"error": "no reference logits"})
        reason = f"{failed_phase}: {payload.get('error', '')}"
    tokens = (results.get("reference") or results.get("decode") or results.get("prefill") or {}).get("tokens")
    perf["roofline"] = record.roofline(params, load.get("config"), perf, results.get("ceilings"))
    verdict_rec = record.verdict_record(params, verdict, reason, failed_phase, metrics, tokens)
    report = render_report(params.to_dict(), rec.finish_meta(load), perf, metrics, vram_summary, verdict_rec)
    rec.finish(load=load, perf=perf, metrics=metrics, vram_summary=vram_summary, samples=sampler.samples,
               verdict=verdict_rec, report=report)
