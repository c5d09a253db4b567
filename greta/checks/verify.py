"""`python -m greta verify <run-dir>`: is a record complete, untampered and self-consistent?

Checks (each failure is one line of the returned list; an empty list means the record verifies):
  manifest    manifest.json is there, every file it lists has its sha256, and no file is unlisted
  params      params.json equals the manifest's params, and metadata.json agrees (run id, seed, model)
  phases      perf.json has every phase; a finished run has all of them ok; a fault record has its
              failed phase with the status its verdict names, and nothing run after it
  artifacts   the files every record has, plus metrics.json and logits.npz when the reference phase ran
  vram        no measured peak (sampled or allocator) is below the analytic weights + KV floor
  verdict     the stated verdict is the one the stored metrics give under the stored thresholds
  logits      when logits.npz is there, greta.checks.analyze recomputes the metrics and verdict from it and
              they must equal the stored ones
An oracle record (oracle.json, from `greta oracle -o`) gets the manifest check and its own: the limits follow
from the stated tolerance and the verdict from the stored numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

from greta.record.metrics import EQUIV_VERDICTS, FAIL, FAULT_VERDICTS, equivalence_verdict
from greta.record.params import PHASES
from greta.record.store import MANIFEST, record_files, sha256_file

BASE = ("params.json", "metadata.json", "perf.json", "vram.json", "vram_samples.csv", "verdict.json", "report.md")
# verdict -> the perf.json statuses its failed phase may end with (the inverse of metrics.FAIL)
FAULT_STATUS = {v: {s for s, w in FAIL.items() if w == v} for v in FAULT_VERDICTS}
LARGE = ("logits.npz",)  # listed in the manifest but kept out of git


def _json(d: Path, name: str, errors: list):
    try:
        return json.loads((d / name).read_text())
    except FileNotFoundError:
        errors.append(f"{name} is missing")
    except (OSError, ValueError) as e:
        errors.append(f"{name} is unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return None


def _check_manifest(d: Path, allow_missing_large: bool) -> tuple[dict | None, list[str]]:
    """(the manifest, reasons): every listed file has its sha256 and no file is unlisted."""
    errors: list[str] = []
    man = _json(d, MANIFEST, errors)
    if man is not None:
        listed = man.get("files", {})
        for name, entry in listed.items():
            p = d / name
            if not p.is_file():
                if not (allow_missing_large and name in LARGE):
                    errors.append(f"{name} is listed in the manifest but missing")
            elif sha256_file(p) != entry.get("sha256"):
                errors.append(f"{name} changed after the record was sealed (sha256 differs from the manifest)")
        for rel in record_files(d):
            if rel not in listed:
                errors.append(f"{rel} is not in the manifest (added after sealing)")
    return man, errors


def _check_oracle(d: Path, man: dict | None) -> list[str]:
    """An oracle record (greta oracle -o): its verdict and limits follow from its stored numbers."""
    from greta.checks.oracle import TOLERANCES, _within, verdict

    errors: list[str] = []
    params, body = _json(d, "params.json", errors), _json(d, "oracle.json", errors)
    for name in ("report.md", "oracle.png"):
        if not (d / name).is_file():
            errors.append(f"{name} is missing")
    if man is not None and params is not None and man.get("params") != params:
        errors.append("params.json differs from the params in the manifest")
    if body is None:
        return errors
    try:
        tol = body["tolerance"]
        if tol != TOLERANCES.get(body["dtype"]):
            errors.append(f"oracle.json tolerance {tol} is not Greta's stated {body['dtype']} tolerance")
        runs = [body] + ([body["control"]] if "control" in body else [])
        for r in runs:
            for p in ("prefill", "decode"):
                want = (tol["rel_factor"] * body["transformers_bf16"][p]["rel"]) if "rel_factor" in tol else tol["rel"]
                if abs(r[p]["limit_rel"] - want) > 1e-12 * max(1.0, want):
                    errors.append(f"{p} limit_rel {r[p]['limit_rel']} does not follow from the tolerance ({want})")
            r["ok"] = _within(r, tol)
        again = verdict(body)
    except (KeyError, TypeError, ValueError) as e:
        return errors + [f"oracle.json cannot be judged: {type(e).__name__}: {e}"]
    if again != body.get("verdict"):
        errors.append(f"oracle.json says {body.get('verdict')}, but its stored numbers give {again}")
    return errors


def verify(run_dir, allow_missing_large: bool = False) -> list[str]:
    """Reasons the record at run_dir does not verify (empty: it does). allow_missing_large: accept a
    manifest-listed logits.npz that is absent (records committed to git leave it out)."""
    d = Path(run_dir)
    if not d.is_dir():
        return [f"{d} is not a directory"]
    man, errors = _check_manifest(d, allow_missing_large)
    if (d / "oracle.json").is_file():
        return errors + _check_oracle(d, man)

    params = _json(d, "params.json", errors)
    meta = _json(d, "metadata.json", errors)
    perf = _json(d, "perf.json", errors)
    verdict = _json(d, "verdict.json", errors)
    vs = _json(d, "vram.json", errors)
    if man is not None and params is not None and man.get("params") != params:
        errors.append("params.json differs from the params in the manifest")
    if params is not None and meta is not None:
        for key in ("seed", "model"):
            if meta.get(key) != params.get(key):
                errors.append(f"metadata.json {key}={meta.get(key)!r} but params.json {key}={params.get(key)!r}")
        if meta.get("run_id") not in (None, d.name):
            errors.append(f"metadata.json run_id {meta.get('run_id')!r} is not the directory name {d.name!r}")
    for name in BASE:  # the JSON members were read above, which reported any that is missing
        if not name.endswith(".json") and not (d / name).is_file():
            errors.append(f"{name} is missing")
    v = (verdict or {}).get("verdict")
    if perf is not None and verdict is not None:
        errors += _check_phases(perf, verdict)
        if perf.get("reference", {}).get("status") == "ok":
            for name in ("metrics.json", "logits.npz"):
                if not (d / name).is_file() and not (allow_missing_large and name in LARGE):
                    errors.append(f"{name} is missing though the reference phase finished")
    if vs is not None:
        if vs.get("below_floor"):
            errors.append("a VRAM figure is below the weights + KV floor: " + "; ".join(vs.get("below_floor_figures", [])))
        floor = (vs.get("floor") or {}).get("total_mb")
        peak = vs.get("peak_vram_mb")
        loaded = perf is None or perf.get("load", {}).get("status") == "ok"  # else weights + KV never existed
        if loaded and floor is not None and peak is not None and peak < floor:
            errors.append(f"sampled VRAM peak {peak} MB is below the analytic floor {floor} MB")
    if v in EQUIV_VERDICTS and params is not None:
        metrics = _json(d, "metrics.json", errors)
        if metrics is not None:
            try:
                again, _ = equivalence_verdict(metrics, params["kv_aligned"], params["thresholds"])
            except Exception as e:  # noqa: BLE001 - a malformed metrics file is a reason, not a crash
                errors.append(f"metrics.json cannot be judged: {type(e).__name__}: {e}")
            else:
                if again != v:
                    errors.append(f"verdict.json says {v}, but the stored metrics give {again}")
            if verdict.get("bit_exact") != metrics.get("bit_exact"):
                errors.append("verdict.json bit_exact differs from metrics.json")
    if (d / "logits.npz").is_file():
        from greta.checks.analyze import analyze_run

        rep = analyze_run(d)
        if rep["status"] != "OK":
            errors += [f"logits: {rep['status']}: {r}" for r in rep["reasons"]]
    return errors


def _check_phases(perf: dict, verdict: dict) -> list[str]:
    errors = []
    missing = [ph for ph in PHASES if ph not in perf]
    if missing:
        return [f"perf.json lacks the phases {', '.join(missing)}"]
    status = [perf[ph].get("status") for ph in PHASES]
    v, failed = verdict.get("verdict"), verdict.get("failed_phase")
    if v == "INTERRUPTED" and failed == "analysis":  # the probe finished; the analysis notebooks were interrupted
        if any(s != "ok" for s in status):
            errors.append(f"INTERRUPTED during analysis but not every phase finished: {dict(zip(PHASES, status))}")
    elif v in FAULT_STATUS:
        if failed not in PHASES:
            return [f"{v} record names no failed phase"]
        i = PHASES.index(failed)
        if status[i] not in FAULT_STATUS[v]:
            errors.append(f"{v} but perf.json says {failed} ended with status {status[i]!r}")
        if any(s != "ok" for s in status[:i]):
            errors.append(f"phases before {failed} did not all finish: {status[:i]}")
        if any(s != "not_run" for s in status[i + 1:]):
            errors.append(f"phases after the failed {failed} have results: {status[i + 1:]}")
    elif v in EQUIV_VERDICTS:
        if any(s != "ok" for s in status):
            errors.append(f"{v} but not every phase finished: {dict(zip(PHASES, status))}")
    else:
        errors.append(f"unknown verdict {v!r}")
    return errors
