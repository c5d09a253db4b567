"""Re-check one run directory (docs/RECORD.md) from its logits: never raises, whatever the input.

:func:`analyze_run` reads ``params.json``, ``logits.npz``, ``metrics.json`` and ``verdict.json``,
recomputes the metrics with :func:`greta.record.metrics.compare` and the verdict with
:func:`greta.record.metrics.equivalence_verdict`, and compares them with what the record stored.

Status (the most severe finding wins, in this order):

``MISSING_LOGITS``
    ``decode``/``reference`` logits cannot be read: ``logits.npz`` is absent, not a regular file
    (a symlink, FIFO or device: refused unopened), over its size cap, truncated or corrupt
    (zip/zlib error), lacks one of those arrays, or holds a non-numeric array under that name.
    Nothing can be recomputed; when metrics.json carries fingerprints (greta.record.fingerprints; a
    batch record's per request, greta.record.batch), its bit_exact and top-1 agreement are still held
    against them (a disagreement is a reason).
``SPAN_MISMATCH``
    the logits are there but their shapes do not fit together: ``decode`` vs ``reference``,
    either vs ``params["span"]`` or ``metrics.json``'s span/vocab, ``positions``/``tokens`` too
    short, or ``positions`` not starting at ``ctx - 1``.
``INCOMPLETE``
    the record cannot be fully verified or is not self-consistent: the run directory is missing;
    ``params.json``/``metrics.json``/``verdict.json`` is missing, unreadable or not a JSON object;
    ``tokens``/``positions`` missing from the npz; or the stored metrics/verdict disagree with
    those recomputed from the logits (a mismatch is INCOMPLETE: the stored audit is not backed by
    its own trace; the reason names the keys that differ).
    A **fault record** (stored verdict FAIL_OOM, FAIL_TIMEOUT, FAIL_ERROR or INTERRUPTED and no
    ``logits.npz``) is also INCOMPLETE, not MISSING_LOGITS: the probe never got to the reference
    phase, so no logits are expected; the reason names the fault and its phase and says the record
    is a complete record of that failure. ``verdict`` is then the stored fault verdict.
``OK``
    the logits are readable and consistent, and the recomputed metrics and verdict equal the
    stored ones.

Every file is read through greta.record.members, the safe reader greta verify uses: inside the run
directory, no symlink followed, regular files only, a size cap per kind, never blocking.

A probe kind that recomputes its own metrics (greta.probe.kinds: ``recompute``; the batch probe's
per-request table from ``batch_logits.npz``) is re-checked the same way: its metrics and verdict
against ``metrics.json`` and ``verdict.json``.

NaN/Inf logits are **not** a status of their own: a record whose logits hold non-finite values
and whose stored metrics/verdict say so (FAIL_EQUIV, "non-finite logits", as the probe writes
it) is ``OK`` with ``verdict`` FAIL_EQUIV. The trace is complete and the analyzer reproduced its
verdict; non-finite logits are an equivalence *result* (``equivalence_verdict`` already fails
them in either kv mode), not a broken trace. A reason always names how many values are
non-finite and at which steps. If the stored verdict disagrees (e.g. PASS_EQUIV over NaN
logits), the mismatch makes the status INCOMPLETE.

The returned dict: ``status``, ``reasons`` (one line each; may be non-empty when OK, e.g. the
non-finite note), ``metrics`` (recomputed, or None), ``verdict`` (recomputed, the stored fault
verdict of a fault record, or None), ``verdict_reason``, ``stored_verdict`` and ``run_dir``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from greta.probe.kinds import UnknownKind, record_kind
from greta.record.files import RecordFileError, read_member_json
from greta.record.members import MemberError, is_member_file, member_kind, open_npz
from greta.record.metrics import FAULT_VERDICTS, compare, equivalence_verdict
from greta.reports import md
from greta.terminal import brief

__all__ = ["STATUSES", "FAULT_VERDICTS", "analyze_run", "report_md", "metrics_for_plots"]

STATUSES = ("OK", "INCOMPLETE", "SPAN_MISMATCH", "MISSING_LOGITS")  # least to most severe
METRIC_KEYS = ("span", "vocab", "max_abs_diff", "p99_abs_diff", "top1_agreement", "bit_exact", "per_position")


def _line(x) -> str:
    """One line, at most about 300 characters (greta.terminal.brief: long words shortened first)."""
    return brief(x)


def _err(exc: BaseException) -> str:
    return _line(f"{type(exc).__name__}: {exc}")


class _Findings:
    def __init__(self):
        self.status = "OK"
        self.reasons: list[str] = []

    def add(self, status: str, reason: str) -> None:
        if STATUSES.index(status) > STATUSES.index(self.status):
            self.status = status
        self.reasons.append(_line(reason))


def _read_json_obj(run: Path, name: str, f: _Findings):
    """A JSON object (dict) from the record member ``name`` (through greta.record.files and its safe reader),
    or None with a finding."""
    try:
        return read_member_json(run, name)
    except FileNotFoundError:
        f.add("INCOMPLETE", f"{name} missing")
    except RecordFileError as exc:  # unreadable, not a regular file, invalid JSON (detail), or not an object
        f.add("INCOMPLETE", str(exc) if "JSON object" in str(exc) else f"{name} unreadable: {exc.detail}")
    except Exception as exc:  # noqa: BLE001
        f.add("INCOMPLETE", f"{name} unreadable: {_err(exc)}")
    return None


def _load_npz(run: Path, f: _Findings) -> dict | None:
    """The arrays of logits.npz, read eagerly (a truncated member fails here, not later), through the
    record's safe reader (a FIFO, symlink or oversized file is refused, never opened or read)."""
    try:
        with open_npz(run, "logits.npz") as z:
            names = list(z.files)
            arrays = {}
            for name in names:
                try:
                    arrays[name] = np.asarray(z[name])
                except Exception as exc:  # noqa: BLE001
                    f.add("MISSING_LOGITS" if name in ("decode", "reference") else "INCOMPLETE",
                          f"logits.npz array '{name}' unreadable: {_err(exc)}")
    except MemberError as exc:
        f.add("MISSING_LOGITS", f"logits.npz cannot be read: {exc.detail}")
        return None
    except Exception as exc:  # noqa: BLE001 - zip errors, a non-npz file...
        f.add("MISSING_LOGITS", f"logits.npz unreadable (truncated or corrupt?): {_err(exc)}")
        return None
    lacking = [n for n in ("decode", "reference") if n not in names]
    if lacking:
        f.add("MISSING_LOGITS", f"logits.npz lacks array(s) {', '.join(lacking)} (has: {', '.join(names) or 'none'})")
    for n in ("tokens", "positions"):
        if n not in names:
            f.add("INCOMPLETE", f"logits.npz lacks array '{n}': metrics cannot be recomputed")
    return arrays


def _steps(rows: np.ndarray, limit: int = 8) -> str:
    s = ", ".join(str(int(i)) for i in rows[:limit])
    return s + (f", ... ({len(rows)} steps)" if len(rows) > limit else "")


def _nonfinite_reason(d: np.ndarray, r: np.ndarray) -> str | None:
    parts = []
    for name, a in (("decode", d), ("reference", r)):
        bad = ~np.isfinite(a)
        n = int(bad.sum())
        if n:
            nan = int(np.isnan(a).sum())
            rows = np.flatnonzero(bad.any(axis=-1))
            step, col = np.argwhere(bad)[0]
            parts.append(f"{name}: {n} of {a.size} ({nan} NaN, {n - nan} Inf) at step(s) {_steps(rows)}, "
                         f"first at step {int(step)} vocab index {int(col)}")
    return ("non-finite logits: " + "; ".join(parts)) if parts else None


def _check_shapes(arrays: dict, params: dict | None, stored: dict | None, f: _Findings) -> bool:
    """SPAN_MISMATCH findings; True when compare() can run on the arrays."""
    d, r = arrays["decode"], arrays["reference"]
    ok = True
    for name, a in (("decode", d), ("reference", r)):
        if a.ndim != 2 or 0 in a.shape:
            f.add("SPAN_MISMATCH", f"{name} logits have shape {tuple(a.shape)}, not [span, vocab]")
            ok = False
        elif not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            f.add("MISSING_LOGITS", f"{name} logits have dtype {a.dtype}, not float32")
            ok = False
    if not ok:
        return False
    if d.shape != r.shape:
        f.add("SPAN_MISMATCH", f"decode logits {tuple(d.shape)} and reference logits {tuple(r.shape)} differ in shape")
        return False
    span, vocab = d.shape
    if params is not None and "span" in params and params["span"] != span:
        f.add("SPAN_MISMATCH", f"logits cover {span} steps but params.json span is {params['span']}")
    if stored is not None:
        for key, have in (("span", span), ("vocab", vocab)):
            if key in stored and stored[key] != have:
                f.add("SPAN_MISMATCH", f"metrics.json {key} is {stored[key]} but the logits have {have}")
    if "positions" in arrays and "tokens" in arrays:
        pos, tok = arrays["positions"].reshape(-1), arrays["tokens"].reshape(-1)
        if pos.size != span:
            f.add("SPAN_MISMATCH", f"positions has {pos.size} entries for {span} logit rows")
            ok = False
        elif params is not None and isinstance(params.get("ctx"), int) and pos.size and int(pos[0]) != params["ctx"] - 1:
            f.add("SPAN_MISMATCH", f"positions start at {int(pos[0])}, not ctx-1 = {params['ctx'] - 1}")
        if tok.size < span:
            f.add("SPAN_MISMATCH", f"tokens has {tok.size} entries, fewer than the {span} logit rows")
            ok = False
    return ok


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_same(a[k], b[k]) for k in a.keys() & b.keys())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _metrics_diff(stored: dict, again: dict) -> list[str]:
    out = []
    for k in again:
        if k not in stored:
            continue  # an older record without this key; the core keys are checked separately
        if k == "per_position":
            s, a = stored[k], again[k]
            if not isinstance(s, list) or len(s) != len(a):
                out.append(f"per_position ({len(s) if isinstance(s, list) else type(s).__name__} rows stored, "
                           f"{len(a)} recomputed)")
            else:
                bad = [j for j, (x, y) in enumerate(zip(s, a)) if not _same(x, y)]
                if bad:
                    out.append(f"per_position (step(s) {', '.join(map(str, bad[:8]))} differ)")
        elif not _same(stored[k], again[k]):
            out.append(f"{k} (stored {stored[k]!r}, recomputed {again[k]!r})")
    return out


def _judged_verdict(verdict_rec: dict | None):
    """The verdict the logits are judged against: verdict.json's, or, for a run interrupted during the
    analysis notebooks after its probe finished, the probe's own (probe_verdict)."""
    if not verdict_rec:
        return None
    if verdict_rec.get("verdict") == "INTERRUPTED" and verdict_rec.get("failed_phase") == "analysis":
        return verdict_rec.get("probe_verdict")
    return verdict_rec.get("verdict")


def _without_logits(run: Path, kind, verdict_rec: dict | None, out: dict, f: _Findings) -> None:
    """No logits file: a fault record is complete without it; any other record cannot be re-checked but from its
    fingerprints."""
    name = kind.logits_file
    stored_verdict = verdict_rec.get("verdict") if verdict_rec else None
    fault = stored_verdict in FAULT_VERDICTS
    if fault:
        out["verdict"] = stored_verdict
        out["verdict_reason"] = _line(verdict_rec.get("reason") or "")
        phase = verdict_rec.get("failed_phase")
        f.add("INCOMPLETE", f"fault record: the run ended in {stored_verdict}"
              f"{f' in phase {phase}' if phase else ''}; no logits are expected, the record is a complete "
              f"record of that failure: {verdict_rec.get('reason') or 'no reason given'}")
    else:
        f.add("MISSING_LOGITS", f"{name} missing: the metrics and verdict cannot be recomputed")
        _check_fingerprints(run, kind, f)
    if is_member_file(run, "metrics.json") and fault:
        f.add("INCOMPLETE", f"metrics.json present in a fault record without {name}")


def _check_fingerprints(run: Path, kind, f: _Findings) -> None:
    """Without the logits: metrics.json's bit_exact and top-1 agreement against its stored fingerprints (the
    kind's own check, greta.probe.kinds: fingerprint_problems)."""
    try:
        stored = read_member_json(run, "metrics.json")
    except (OSError, RecordFileError):
        return  # MISSING_LOGITS already says nothing can be recomputed
    if not isinstance(stored, dict):
        return
    bad = kind.fingerprint_problems(stored)  # [] for a record made before fingerprints
    for reason in bad:
        f.add("INCOMPLETE", reason)
    if not bad and kind.fingerprint_rows(stored) is not None:
        f.add("OK", "metrics.json's fingerprints agree with its bit_exact and top-1 agreement (the logits are absent)")


def _recheck_verdict(params: dict, metrics: dict, verdict_rec: dict | None, out: dict, f: _Findings) -> None:
    """The verdict the recomputed metrics give under params.json's thresholds, against verdict.json's."""
    th, kv = params.get("thresholds"), params.get("kv_aligned")
    if not isinstance(th, dict) or kv is None:
        f.add("INCOMPLETE", "params.json lacks thresholds or kv_aligned: the verdict cannot be recomputed")
        return
    try:
        verdict, reason = equivalence_verdict(metrics, kv, th, params.get("engine", "greta"))
    except Exception as exc:  # noqa: BLE001 - e.g. a threshold key missing from an older params.json
        f.add("INCOMPLETE", f"recomputing the verdict failed: {_err(exc)}")
        return
    out["verdict"], out["verdict_reason"] = verdict, reason
    stored_verdict = _judged_verdict(verdict_rec)
    if verdict_rec is not None and stored_verdict != verdict:
        f.add("INCOMPLETE", f"verdict.json says {stored_verdict} but the logits give {verdict} ({reason})")


def _analyze(run_dir, out: dict, f: _Findings) -> None:
    run = Path(run_dir)
    out["run_dir"] = str(run)
    if not run.exists():
        f.add("INCOMPLETE", f"run directory {run} does not exist")
        return
    if not run.is_dir():
        f.add("INCOMPLETE", f"run directory {run} is not a directory")
        return

    params = _read_json_obj(run, "params.json", f)
    verdict_rec = _read_json_obj(run, "verdict.json", f)
    stored_verdict = _judged_verdict(verdict_rec)
    out["stored_verdict"] = stored_verdict if isinstance(stored_verdict, str) else None
    try:
        kind = record_kind(params or {})  # None: params.json unreadable (already a finding)
    except UnknownKind as e:
        f.add("INCOMPLETE", f"params.json: {e}")
        return
    if kind.recompute is not None:
        _analyze_recomputed(run, kind, params, verdict_rec, out, f)
        return
    if member_kind(run, "logits.npz") is None:
        _without_logits(run, kind, verdict_rec, out, f)
        return

    stored = _read_json_obj(run, "metrics.json", f)
    if stored is not None:
        lacking = [k for k in METRIC_KEYS if k not in stored]
        if lacking:
            f.add("INCOMPLETE", f"metrics.json lacks key(s) {', '.join(lacking)}")

    arrays = _load_npz(run, f)
    if not arrays or "decode" not in arrays or "reference" not in arrays:
        return
    if not _check_shapes(arrays, params, stored, f) or "tokens" not in arrays or "positions" not in arrays:
        return

    d = np.asarray(arrays["decode"], dtype=np.float32)
    r = np.asarray(arrays["reference"], dtype=np.float32)
    nonfinite = _nonfinite_reason(d, r)
    if nonfinite:
        f.add("OK", nonfinite)

    span = d.shape[0]
    rows = stored.get("per_position") if stored else None
    if isinstance(rows, list) and len(rows) == span and all(isinstance(x, dict) and "source" in x for x in rows):
        sources = [str(x["source"]) for x in rows]
    else:
        sources = ["prefill"] + ["decode"] * (span - 1)
    try:
        with np.errstate(all="ignore"):  # NaN/Inf and zero norms are reported, not warned about
            metrics = compare(d, r, arrays["tokens"].reshape(-1).tolist(), arrays["positions"].reshape(-1).tolist(),
                              sources)
    except Exception as exc:  # noqa: BLE001
        f.add("INCOMPLETE", f"recomputing the metrics failed: {_err(exc)}")
        return
    out["metrics"] = metrics

    if stored is not None:
        diff = _metrics_diff(stored, metrics)
        if diff:
            keys = ", ".join(d.split(" ", 1)[0] for d in diff)  # names first: the details may be cut at 300 chars
            f.add("INCOMPLETE", f"metrics.json disagrees with the metrics recomputed from logits.npz in {keys}: " + "; ".join(diff))

    if params is not None:
        _recheck_verdict(params, metrics, verdict_rec, out, f)


def _analyze_recomputed(run: Path, kind, params: dict, verdict_rec: dict | None, out: dict, f: _Findings) -> None:
    """A kind that recomputes its own metrics (e.g. the batch probe's per-request table from batch_logits.npz):
    they and the verdict they give, against metrics.json and verdict.json (the figures greta verify holds)."""
    if member_kind(run, kind.logits_file) is None:
        _without_logits(run, kind, verdict_rec, out, f)
        return
    try:
        metrics, verdict, reason = kind.recompute(run, params)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or lacking an array
        f.add("MISSING_LOGITS", f"{kind.logits_file} cannot be read back: {_err(exc)}")
        return
    out.update(metrics=metrics, verdict=verdict, verdict_reason=_line(reason))
    stored = _read_json_obj(run, "metrics.json", f)
    bad = kind.differing(metrics, stored) if stored is not None else []
    if bad:
        f.add("INCOMPLETE", f"metrics.json disagrees with the metrics recomputed from {kind.logits_file} in {', '.join(bad)}")
    if out["stored_verdict"] != verdict:
        f.add("INCOMPLETE", f"verdict.json says {out['stored_verdict']}, the recomputed metrics give {verdict}")


def analyze_run(run_dir) -> dict:
    """Re-check a run directory from its logits. Never raises; see the module docstring for the statuses."""
    f = _Findings()
    out = {"run_dir": None, "status": "OK", "reasons": [], "metrics": None, "verdict": None,
           "verdict_reason": None, "stored_verdict": None}
    try:
        _analyze(run_dir, out, f)
    except Exception as exc:  # noqa: BLE001 - the analyzer itself must never crash its caller
        out["metrics"] = out["verdict"] = None
        f.add("INCOMPLETE", f"analyzer error: {_err(exc)}")
    out["status"], out["reasons"] = f.status, f.reasons
    return out


def report_md(report: dict) -> str:
    """The analyzer's findings as markdown: the status as a heading, one bullet per reason."""
    status = report.get("status", "?")
    mark = "✓" if status == "OK" else "⚠"
    lines = [md.heading(2, "Trace check: ", mark, " ", md.bold(status)), ""]
    if report.get("verdict"):
        stored = md.line(" (stored: ", report["stored_verdict"], ")", sep="") if report.get("stored_verdict") else ""
        lines += [md.line("Verdict from the trace: ", md.bold(report["verdict"]), stored, sep=""), ""]
    if status != "OK":
        lines += ["The record could not be verified from its trace (reasons below). The figures that follow are "
                  "recomputed from the logits where they could be read, otherwise taken from metrics.json with a "
                  "warning, or skipped.", ""]
    lines += md.bullets(report.get("reasons") or []) or ["- logits.npz, metrics.json and verdict.json agree"]
    return "\n".join(lines)


def _usable_metrics(m) -> bool:
    return isinstance(m, dict) and isinstance(m.get("per_position"), list) and all(
        isinstance(x, dict) for x in m["per_position"])


def metrics_for_plots(report: dict, run_dir) -> tuple[dict | None, str]:
    """(metrics to plot, a markdown note). None: skip the per-position plot and table.

    Recomputed metrics first; otherwise the stored metrics.json, flagged as not verified; a fault
    record gets ``{}`` (the plot then shows the verdict and "no per-position metrics").
    """
    status = report.get("status", "?")
    if _usable_metrics(report.get("metrics")):
        if status == "OK":
            return report["metrics"], "_Recomputed from logits.npz; they equal metrics.json._"
        return report["metrics"], f"**Recomputed from logits.npz** (status {status}: see the reasons above)."
    try:
        stored = read_member_json(run_dir, "metrics.json")
    except (OSError, RecordFileError):
        stored = None
    if _usable_metrics(stored):
        return stored, f"**⚠ From metrics.json as stored, not verified against the logits** (status {status})."
    if report.get("stored_verdict") in FAULT_VERDICTS and stored is None:
        return {}, f"_No per-position metrics: the run ended in {report['stored_verdict']}._"
    return None, f"_Per-position plot and top-1 table skipped: no usable metrics (status {status})._"
