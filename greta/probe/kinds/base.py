"""What a probe kind is (greta.probe.kinds holds one of each): the interface every kind fills in."""
from __future__ import annotations

from greta.record.kinds import ProbeSpec
from greta.record.metrics import FAULT_VERDICTS


class UnknownKind(KeyError):
    """A params.probe (or a record's params.json) naming a kind this checkout does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown probe kind"


class ProbeKind:
    """One probe kind. Subclasses set the data and fill in the methods; one instance each (greta.probe.kinds)."""
    spec: ProbeSpec
    title: str                              # how its pages and sweep report name it
    pass_verdict: str                       # kv_aligned=1, judged and held: what a kv1 sweep point must say
    fail_verdict: str                       # kv_aligned=1, judged and not held
    drift_verdict: str                      # kv_aligned=0: measured, not held
    engine_drift_verdict: str | None = None  # a peer engine under audit that is not bit-exact: measured, not held
    uses_thresholds: bool                   # its kv1 judgement reads params.thresholds (report.md states them)
    logits_file: str                        # its logits, in the manifest, kept out of git
    run_notebook: str                       # notebooks/<run_notebook>: the audit executes it into the record
    analysis_notebooks: tuple[str, ...]     # executed into the record after the probe
    figures: tuple[tuple[str, str], ...]    # (png, what it shows): the figures its run page shows

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def verdicts(self) -> tuple[str, ...]:
        """Its judged verdicts (the reference phase ran); faults: greta.record.metrics.FAULT_VERDICTS."""
        return (self.pass_verdict, self.fail_verdict, self.drift_verdict) + self._peer_verdicts

    def ok(self, verdict: str) -> bool:
        """Held (kv1), measured as expected (kv0), or a peer engine's drift measured (ENGINE_DRIFT: a complete
        result about that engine, not a failure of Greta's): exit code 0, not drawn as a failure."""
        return verdict in (self.pass_verdict, self.drift_verdict) + self._peer_verdicts

    @property
    def _peer_verdicts(self) -> tuple[str, ...]:
        return (self.engine_drift_verdict,) if self.engine_drift_verdict else ()

    def exit_code(self, verdict: str) -> int:
        """greta probe / audit: 0 for ok(), 1 for any failure or fault."""
        return 0 if self.ok(verdict) else 1

    def knows(self, verdict) -> bool:
        return verdict in self.verdicts or verdict in FAULT_VERDICTS

    # --- running: greta.probe.runner ---------------------------------------------------------------------
    def job(self) -> type:
        """The worker's ProbeJob subclass (imported lazily: it imports torch)."""
        raise NotImplementedError

    def finish(self, rec, params, perf, results, vram_summary, sampler, failure) -> None:
        """Write the record (metrics, logits, verdict, report.md) from the phases' results or up to the fault."""
        raise NotImplementedError

    def render(self, params: dict, meta, perf, metrics, vram_summary, verdict) -> str:
        """report.md from the record's data: params is its params.json dict (a live run: Params.to_dict())."""
        raise NotImplementedError

    def preflight(self, p, cfg, have_bytes: int) -> None:
        """Its own checks against this machine (ParamError, one line); tp is checked by preflight."""

    def kv_sequences(self, p) -> int:
        """The sequences its runner holds a KV slab for (preflight sizes the cache by it)."""
        return 1

    # --- reading back: greta.checks ----------------------------------------------------------------------
    def check_judgement(self, rec) -> list[str]:
        """greta verify: the stated verdict is the one the stored metrics give; the logits give those metrics.
        rec: read_record's files, its params the record's params.json dict (untrusted JSON, read as such)."""
        raise NotImplementedError

    # greta analyze: a method (run dir, its params.json dict) -> (metrics, verdict, reason) recomputed from the kind's
    # logits file, read through greta.record.members; None: greta.checks.analyze's own analysis of logits.npz (B3.77's, position by position)
    recompute = None

    # --- fingerprints (greta.record.fingerprints): re-checking a record whose logits file is absent ----------
    def fingerprint_problems(self, metrics: dict) -> list[str]:
        """greta verify and analyze: where metrics.json's bit_exact (and top-1 agreement) disagree with its
        fingerprints, one line each; [] when they agree or the record has none (made before them)."""
        from greta.record.fingerprints import problems

        return problems(metrics)

    def fingerprint_rows(self, metrics: dict | None) -> list[dict] | None:
        """greta reproduce without logits: the rows its fingerprints are compared by, [{"step", "position",
        "fingerprint": {path: row fingerprint}} (and "request" where a record holds several)], in a fixed order;
        None when the record has none (default: B3.77's per_position)."""
        rows = (metrics or {}).get("per_position")
        ok = isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and isinstance(r.get("fingerprint"), dict)
                                                          for r in rows)
        return rows if ok else None

    def row_path(self, metrics: dict):
        """greta reproduce: (array name, row) -> the phase/path that row of its logits file holds (default: the
        array's name)."""
        return lambda name, row: name

    def differing(self, again: dict, stored: dict) -> list[str]:
        """The metrics keys where stored metrics are not the recomputed ones."""
        return [k for k in again if again[k] != stored.get(k)]

    # --- its sweeps: greta.sweeps.report, notebooks/sweep_report.ipynb --------------------------------------
    sweep_matrix: str                       # the axes its matrices declare (how the report names them)

    def sweep_intro(self) -> str:
        """The sweep report's opening: what a point is and what the guardrail holds (Markdown)."""
        return (f"One {self.title} record per point of the declared matrix ({self.sweep_matrix}). The guardrail: "
                f"**PASS_GUARDRAIL** when every declared point has a complete (verifying) record and every "
                f"kv_aligned=1 point is {self.pass_verdict}; **FAIL_GUARDRAIL** when a kv_aligned=1 point is anything "
                "else; **INCOMPLETE** when points are missing (named below).")

    def sweep_sections(self, rows: list[dict], fig_path) -> list:
        """Its part of the sweep report: greta.reports.sweep_section.Section list, figures drawn to fig_path(name)."""
        raise NotImplementedError
