"""The tp-invariance probe's record: what greta.probe.runner.run_probe writes when params.probe is
tp_invariance, from what its phases returned (greta/probe/tp_invariance_worker.py) or up to the fault that
stopped them. The same files as a B3.77 record (docs/RECORD.md), with metrics.json holding the per-degree
comparisons and tp_logits.npz the logits."""
from __future__ import annotations

from greta.record import store as record
from greta.record.tp_invariance import LOGITS_FILE, logits_arrays, tp_metrics, tp_verdict
from greta.reports.tp_invariance_report import render_tp_report


def finish_tp_invariance(rec, params, perf, results, vram_summary, sampler, failure):
    """Metrics, verdict and report of a tp-invariance run: everything measured up to any fault."""
    load = results.get("load", {})
    metrics, failed_phase = None, None
    if "reference" in results:
        r = results["reference"]
        logits = {"degrees": r["degrees"], **r["logits"]}
        metrics = tp_metrics(logits, params.ctx)
        rec.write_npz(LOGITS_FILE, **logits_arrays(logits))
        verdict, reason = tp_verdict(metrics, params.kv_aligned)
    else:
        verdict, failed_phase, payload = failure or ("FAIL_ERROR", None, {"error": "no reference logits"})
        reason = f"{failed_phase}: {payload.get('error', '')}"
    tokens = (results.get("reference") or results.get("decode") or results.get("prefill") or {}).get("tokens")
    perf["roofline"] = {"available": False, "why": "the tp-invariance probe runs several degrees per phase; it "
                                                   "compares bits, not speed"}
    verdict_rec = record.verdict_record(params, verdict, reason, failed_phase, metrics, tokens)
    report = render_tp_report(params.to_dict(), rec.finish_meta(load), perf, metrics, vram_summary, verdict_rec)
    rec.finish(load=load, perf=perf, metrics=metrics, vram_summary=vram_summary, samples=sampler.samples,
               verdict=verdict_rec, report=report)
