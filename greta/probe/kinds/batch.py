"""The batch probe: every request bit-identical alone, in the batch and in its prefill reference
(greta/record/batch.py says what it compares).

Its job: greta.probe.batch_worker; its record: greta.probe.batch_record (metrics.json per request,
batch_logits.npz); its report.md: greta.reports.batch_report; its run notebook: notebooks/batch_probe.ipynb.
"""
from __future__ import annotations

from pathlib import Path

from greta.probe.kinds.base import ProbeKind
from greta.record.batch import (BATCH_VERDICTS, LOGITS_FILE, batch_verdict, fingerprint_problems, fingerprint_rows,
                                metrics_from_logits)
from greta.record.kinds import SPECS

FIGURES = ("max_abs_diff", "bit_exact", "finite", "worst_request", "inexact_requests", "per_request")


class BatchKind(ProbeKind):
    spec = SPECS["batch"]
    title = "Batch probe"
    pass_verdict, fail_verdict, drift_verdict = BATCH_VERDICTS[0], BATCH_VERDICTS[1], BATCH_VERDICTS[2]
    uses_thresholds = False  # its judgement reads params.thresholds (report.md must state them)
    logits_file = LOGITS_FILE
    run_notebook = "batch_probe.ipynb"
    analysis_notebooks = ("vram_plot.ipynb",)  # equivalence_analysis reads B3.77's per-position logits.npz
    figures = (("vram_plot.png", "memory over time"),)
    sweep_matrix = "batch × ctx × kv_aligned × seed × dtype"

    def job(self) -> type:
        from greta.probe.batch_worker import BatchJob

        return BatchJob

    def finish(self, rec, params, perf, results, vram_summary, sampler, failure) -> None:
        from greta.probe.batch_record import finish_batch

        finish_batch(rec, params, perf, results, vram_summary, sampler, failure)

    def render(self, params, meta, perf, metrics, vram_summary, verdict) -> str:
        from greta.reports.batch_report import render_batch_report

        return render_batch_report(params, meta, perf, metrics, vram_summary, verdict)

    def kv_sequences(self, p) -> int:
        return p.batch  # a KV slab per request (greta.engine.kvcache.KVCache)

    def check_judgement(self, rec) -> list[str]:
        """The stated verdict against metrics.json, and metrics.json against batch_logits.npz (its fingerprints:
        greta verify, through fingerprint_problems)."""
        v = rec.verdict.verdict if rec.verdict else None
        if v not in BATCH_VERDICTS or rec.params is None:
            return []
        if rec.metrics is None:
            return rec.problem_lines(["metrics.json"]) or ["metrics.json is missing though the reference phase finished"]
        m = rec.metrics.figures()
        errors = []
        try:
            again, _ = batch_verdict(m, rec.params["kv_aligned"])
        except Exception as e:  # noqa: BLE001 - a malformed metrics file is a reason, not a crash
            return [f"metrics.json cannot be judged as a batch record: {type(e).__name__}: {e}"]
        if again != v:
            errors.append(f"verdict.json says {v}, but the stored metrics give {again}")
        if rec.verdict.bit_exact != m.get("bit_exact"):
            errors.append("verdict.json bit_exact differs from metrics.json")
        return errors + self._check_logits(Path(rec.run_dir), m)

    def _check_logits(self, d: Path, m: dict) -> list[str]:
        from greta.record.members import member_kind

        if member_kind(d, LOGITS_FILE) is None:
            return []  # its absence is the artifacts check's (a committed record may leave it out)
        try:
            again, _, _ = self.recompute(d, {"kv_aligned": 1})
        except Exception as e:  # noqa: BLE001
            return [f"{LOGITS_FILE} cannot be read back: {type(e).__name__}: {e}"]
        return [f"metrics.json {k} is not what {LOGITS_FILE} gives" for k in self.differing(again, m)]

    def recompute(self, run_dir, params: dict) -> tuple[dict, str, str]:
        """The batch metrics and verdict recomputed from a record's batch_logits.npz, read through
        greta.record.members, the safe reader (raises if it cannot be read back)."""
        from greta.record.members import load_npz

        arrays = load_npz(run_dir, LOGITS_FILE)
        metrics = metrics_from_logits(arrays, arrays["lengths"].tolist(), arrays["gens"].tolist())
        return (metrics, *batch_verdict(metrics, params.get("kv_aligned")))

    def differing(self, again: dict, stored: dict) -> list[str]:
        return [k for k in FIGURES if again[k] != stored.get(k)]

    def fingerprint_problems(self, metrics: dict) -> list[str]:
        """Each request's and the batch's bit_exact, top1_agreement and inexact_requests against the per-request
        fingerprints (greta.record.batch)."""
        return fingerprint_problems(metrics)

    def fingerprint_rows(self, metrics: dict | None) -> list[dict] | None:
        """Every request's rows in request order, each naming its request, with the paths alone, batch, reference."""
        return fingerprint_rows(metrics or {})

    def sweep_sections(self, rows: list[dict], fig_path) -> list:
        from greta.reports.sweep_batch import sweep_sections

        return sweep_sections(rows, fig_path)


BATCH = BatchKind()
