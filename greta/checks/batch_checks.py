"""greta verify's checks of a batch probe record (greta/record/batch.py): its verdict is the one its stored
metrics give, and metrics.json is what batch_logits.npz gives when recomputed."""
from __future__ import annotations

from pathlib import Path

from greta.record.members import load_npz, member_kind
from greta.record.batch import BATCH_VERDICTS, LOGITS_FILE, batch_verdict, metrics_from_logits

FIGURES = ("max_abs_diff", "bit_exact", "finite", "worst_request", "inexact_requests")


def check_batch_judgement(rec) -> list[str]:
    """The stated verdict against metrics.json, and metrics.json against batch_logits.npz."""
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
    return errors + _check_logits(Path(rec.run_dir), m)


def metrics_again(run_dir) -> dict:
    """The batch metrics recomputed from a record's batch_logits.npz, read through greta.record.members
    (raises if it cannot be read back)."""
    arrays = load_npz(run_dir, LOGITS_FILE)
    return metrics_from_logits(arrays, arrays["lengths"].tolist(), arrays["gens"].tolist())


def differing(again: dict, stored: dict) -> list[str]:
    """The figures (and the per-request table) where stored metrics are not the recomputed ones."""
    return [k for k in (*FIGURES, "per_request") if again[k] != stored.get(k)]


def _check_logits(d: Path, m: dict) -> list[str]:
    if member_kind(d, LOGITS_FILE) is None:
        return []  # its absence is the artifacts check's (a committed record may leave it out)
    try:
        again = metrics_again(d)
    except Exception as e:  # noqa: BLE001
        return [f"{LOGITS_FILE} cannot be read back: {type(e).__name__}: {e}"]
    return [f"metrics.json {k} is not what {LOGITS_FILE} gives" for k in differing(again, m)]
