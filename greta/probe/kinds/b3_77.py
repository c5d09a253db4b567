"""B3.77: the long-context prefill/decode equivalence probe (docs/RECORD.md).

Its job: greta.probe.b3_77_worker; its record: greta.probe.b3_77_record (metrics.json per position,
logits.npz); its verdicts: greta.record.metrics; its report.md: greta.reports.run_report; its run notebook:
notebooks/run_b3_77.ipynb; greta analyze re-checks its logits.npz position by position.
"""
from __future__ import annotations

from greta.probe.kinds.base import ProbeKind
from greta.record.kinds import SPECS
from greta.record.metrics import EQUIV_VERDICTS, equivalence_verdict


class B377Kind(ProbeKind):
    spec = SPECS["b3_77"]
    title = "B3.77"
    pass_verdict, fail_verdict, drift_verdict = "PASS_EQUIV", "FAIL_EQUIV", "EXPECTED_DRIFT"
    engine_drift_verdict = "ENGINE_DRIFT"  # a peer engine (params engine) not bit-exact to its own prefill
    uses_thresholds = True  # its judgement reads params.thresholds (report.md must state them)
    logits_file = "logits.npz"
    run_notebook = "run_b3_77.ipynb"
    analysis_notebooks = ("vram_plot.ipynb", "equivalence_analysis.ipynb")
    figures = (("vram_plot.png", "memory over time"), ("equivalence.png", "per-position |Δlogit|"))
    sweep_matrix = "ctx × kv_aligned × seed × dtype, × engine where declared"

    def job(self) -> type:
        from greta.probe.b3_77_worker import B377Job

        return B377Job

    def finish(self, rec, params, perf, results, vram_summary, sampler, failure) -> None:
        from greta.probe.b3_77_record import finish_b3_77

        finish_b3_77(rec, params, perf, results, vram_summary, sampler, failure)

    def render(self, params, meta, perf, metrics, vram_summary, verdict) -> str:
        from greta.reports.run_report import render_report

        return render_report(params, meta, perf, metrics, vram_summary, verdict)

    def check_judgement(self, rec) -> list[str]:
        """The stated verdict is the one the stored metrics give under the stored thresholds."""
        v = rec.verdict.verdict if rec.verdict else None
        if v not in EQUIV_VERDICTS or rec.params is None:
            return []
        errors = rec.problem_lines(["metrics.json"])
        if rec.metrics is None:
            return errors
        try:
            again, _ = equivalence_verdict(rec.metrics.figures(), rec.params["kv_aligned"], rec.params["thresholds"],
                                           rec.params.get("engine", "greta"))
        except Exception as e:  # noqa: BLE001 - a malformed metrics file is a reason, not a crash
            errors.append(f"metrics.json cannot be judged: {type(e).__name__}: {e}")
        else:
            if again != v:
                errors.append(f"verdict.json says {v}, but the stored metrics give {again}")
        if rec.verdict.bit_exact != rec.metrics.bit_exact:
            errors.append("verdict.json bit_exact differs from metrics.json")
        return errors

    def row_path(self, metrics: dict):
        """logits.npz: "decode" holds the tested path (row 0 the prefill's last position, then decode steps, as
        metrics.json per_position[j].source says), "reference" the reference phase's rows."""
        rows = metrics.get("per_position") or []

        def path(name: str, row: int) -> str:
            if name == "decode" and row < len(rows) and isinstance(rows[row], dict):
                return str(rows[row].get("source", name))
            return name
        return path

    def sweep_sections(self, rows: list[dict], fig_path) -> list:
        from greta.reports.sweep_b3_77 import sweep_sections

        return sweep_sections(rows, fig_path)


B3_77 = B377Kind()
assert B3_77.verdicts == EQUIV_VERDICTS
