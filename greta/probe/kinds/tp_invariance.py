"""The tp-invariance probe: one prompt at tensor-parallel degrees 1, 2, .. tp, every logit bit-identical
(greta/record/tp_invariance.py says what it compares; docs/TP.md why the segment tree makes it hold).

Its job: greta.probe.tp_invariance_worker; its record: greta.probe.tp_invariance_record (metrics.json per
degree, tp_logits.npz); its report.md: greta.reports.tp_invariance_report; its heat map:
greta.reports.tp_heatmap (notebooks/tp_heatmap.ipynb); its run notebook: notebooks/tp_invariance_probe.ipynb.
"""
from __future__ import annotations

from pathlib import Path

from greta.probe.kinds.base import ProbeKind
from greta.record.kinds import SPECS
from greta.record.params import ParamError, show
from greta.record.tp_invariance import LOGITS_FILE, TP_VERDICTS, degrees_of, fingerprint_problems, tp_verdict

FIGURES = ("max_abs_diff", "bit_exact", "finite", "first_difference", "across", "within", "pairs", "fingerprints")


class TPInvarianceKind(ProbeKind):
    spec = SPECS["tp_invariance"]
    title = "TP invariance"
    pass_verdict, fail_verdict, drift_verdict = TP_VERDICTS
    uses_thresholds = False  # bit for bit: no tolerance
    logits_file = LOGITS_FILE
    run_notebook = "tp_invariance_probe.ipynb"
    analysis_notebooks = ("vram_plot.ipynb", "tp_heatmap.ipynb")
    figures = (("vram_plot.png", "memory over time"), ("tp_heatmap.png", "degree × position |Δlogit| against tp=1"))
    sweep_matrix = "ctx × kv_aligned × seed × dtype; each point compares tp 1, 2, .. tp"

    def job(self) -> type:
        from greta.probe.tp_invariance_worker import TPInvarianceJob

        return TPInvarianceJob

    def finish(self, rec, params, perf, results, vram_summary, sampler, failure) -> None:
        from greta.probe.tp_invariance_record import finish_tp_invariance

        finish_tp_invariance(rec, params, perf, results, vram_summary, sampler, failure)

    def render(self, params, meta, perf, metrics, vram_summary, verdict) -> str:
        from greta.reports.tp_invariance_report import render_tp_report

        return render_tp_report(params, meta, perf, metrics, vram_summary, verdict)

    def preflight(self, p, cfg, have_bytes: int) -> None:
        """Every degree holds whole subtrees of the model's tree (S/d a power of two), and rank 0, which holds
        every degree's shard and KV cache, fits."""
        from greta.engine.config import cache_tokens, check_tree, kv_bytes, tree_segments
        from greta.record.params import dtype_bytes

        if p.kv_aligned:
            for d in degrees_of(p.tp):
                try:
                    check_tree(cfg, tree_segments(cfg), d)
                except ValueError as e:
                    raise ParamError(f"param probe=tp_invariance with model {show(p.model)} at tp={d}: {e}") from None
        b, tokens = dtype_bytes(p.dtype), cache_tokens(p.ctx + p.gen, p.prefill_chunk)
        need = sum(cfg.rank_param_count(d) * b + kv_bytes(cfg, 1, tokens, p.kv_block, b, heads=cfg.n_kv_heads // d)
                   for d in degrees_of(p.tp))
        if need > have_bytes:
            raise ParamError(f"params tp={p.tp}, ctx={p.ctx}: rank 0 holds every degree's shard and KV cache, "
                             f"{need / 2**30:.3g} GiB, but {p.device} has {have_bytes / 2**30:.3g} GiB; lower -p tp "
                             "or -p ctx")

    def check_judgement(self, rec) -> list[str]:
        """The stated verdict against metrics.json, and metrics.json against tp_logits.npz (its fingerprints:
        greta verify, through fingerprint_problems)."""
        v = rec.verdict.verdict if rec.verdict else None
        if v not in TP_VERDICTS or rec.params is None:
            return []
        if rec.metrics is None:
            return rec.problem_lines(["metrics.json"]) or ["metrics.json is missing though the reference phase finished"]
        m = rec.metrics.figures()
        try:
            again, _ = tp_verdict(m, rec.params["kv_aligned"])
        except Exception as e:  # noqa: BLE001 - a malformed metrics file is a reason, not a crash
            return [f"metrics.json cannot be judged as a tp-invariance record: {type(e).__name__}: {e}"]
        errors = [f"verdict.json says {v}, but the stored metrics give {again}"] if again != v else []
        if rec.verdict.bit_exact != m.get("bit_exact"):
            errors.append("verdict.json bit_exact differs from metrics.json")
        return errors + self._check_logits(Path(rec.run_dir), m, rec.params)

    def _check_logits(self, d: Path, m: dict, params: dict) -> list[str]:
        from greta.record.members import member_kind

        if member_kind(d, LOGITS_FILE) is None:
            return []  # its absence is the artifacts check's (a committed record leaves it out)
        try:
            again, _, _ = self.recompute(d, params)
        except Exception as e:  # noqa: BLE001
            return [f"{LOGITS_FILE} cannot be read back: {type(e).__name__}: {e}"]
        return [f"metrics.json {k} is not what {LOGITS_FILE} gives" for k in self.differing(again, m)]

    def recompute(self, run_dir, params: dict) -> tuple[dict, str, str]:
        """The metrics and verdict recomputed from a record's tp_logits.npz, read through greta.record.members,
        the safe reader (raises if it cannot be read back)."""
        from greta.record.members import load_npz
        from greta.record.tp_invariance import logits_from_arrays, tp_metrics

        metrics = tp_metrics(logits_from_arrays(load_npz(run_dir, LOGITS_FILE)), params["ctx"])
        return (metrics, *tp_verdict(metrics, params.get("kv_aligned")))

    def differing(self, again: dict, stored: dict) -> list[str]:
        return [k for k in FIGURES if again[k] != stored.get(k)]

    def fingerprint_problems(self, metrics: dict) -> list[str]:
        """bit_exact against the fingerprints of every degree and path (greta.record.tp_invariance)."""
        return fingerprint_problems(metrics)

    def fingerprint_rows(self, metrics: dict | None) -> list[dict] | None:
        return None  # its fingerprints are per degree, not per compared position: greta reproduce needs tp_logits.npz

    def sweep_sections(self, rows: list[dict], fig_path) -> list:
        from greta.reports.sweep_tp_invariance import sweep_sections

        return sweep_sections(rows, fig_path)


TP_INVARIANCE = TPInvarianceKind()
