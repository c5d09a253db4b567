"""Compare decode-path logits with the prefill path's reference, and turn the numbers into a verdict."""
from __future__ import annotations

import numpy as np

from greta.record.fingerprints import fingerprint_rows

# The verdict groups, defined once (verify, analyze, probe and notebooks derive theirs from these).
# the reference phase ran: judged from the logits. ENGINE_DRIFT: a peer engine (params engine, not greta) whose
# decode is not bit-identical to its own prefill; measured, like EXPECTED_DRIFT, not a failure of Greta's.
EQUIV_VERDICTS = ("PASS_EQUIV", "FAIL_EQUIV", "EXPECTED_DRIFT", "ENGINE_DRIFT")
FAULT_VERDICTS = ("FAIL_OOM", "FAIL_TIMEOUT", "FAIL_ERROR", "INTERRUPTED")  # a phase did not finish
VERDICTS = EQUIV_VERDICTS + FAULT_VERDICTS
# The status a failed phase ends with (perf.json) -> the record's verdict.
FAIL = {"timeout": "FAIL_TIMEOUT", "oom": "FAIL_OOM", "crash": "FAIL_ERROR", "error": "FAIL_ERROR",
        "interrupted": "INTERRUPTED"}
assert set(FAIL.values()) == set(FAULT_VERDICTS)


def compare(decode: np.ndarray, reference: np.ndarray, tokens: list[int], positions: list[int],
            sources: list[str]) -> dict:
    """decode, reference: float32 [span, vocab]. tokens: the generated ids (tokens[j] came from decode[j]).
    Each per_position row carries the fingerprint of both its rows (greta.record.fingerprints)."""
    d = np.asarray(decode, dtype=np.float32)
    r = np.asarray(reference, dtype=np.float32)
    if d.shape != r.shape:
        raise ValueError(f"logits shapes differ: decode {d.shape} vs reference {r.shape}")
    diff = np.abs(d.astype(np.float64) - r.astype(np.float64))
    finite = bool(np.isfinite(d).all() and np.isfinite(r).all())
    ad, ar = d.argmax(-1), r.argmax(-1)
    cos = (d * r).sum(-1, dtype=np.float64) / (
        np.linalg.norm(d.astype(np.float64), axis=-1) * np.linalg.norm(r.astype(np.float64), axis=-1))
    agree = ad == ar
    mism = np.flatnonzero(~agree)
    prints = fingerprint_rows(d, r, sources)
    rows = [{
        "step": j, "position": int(positions[j]), "source": sources[j],
        "max_abs_diff": float(diff[j].max()), "mean_abs_diff": float(diff[j].mean()), "cosine": float(cos[j]),
        "argmax_decode": int(ad[j]), "argmax_reference": int(ar[j]), "agree": bool(agree[j]),
        "fingerprint": prints[j],
    } for j in range(d.shape[0])]
    return {
        "span": int(d.shape[0]), "vocab": int(d.shape[1]), "finite": finite,
        "max_abs_diff": float(diff.max()), "p99_abs_diff": float(np.quantile(diff, 0.99)),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(agree.mean()), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
        "first_argmax_mismatch": int(mism[0]) if mism.size else None,
        "bit_exact": bool(finite and np.array_equal(d.view(np.uint32), r.view(np.uint32))),
        "tokens_agree": bool(all(int(t) == int(a) for t, a in zip(tokens[: d.shape[0]], ar))),
        "distinct_argmax": int(np.unique(ar).size),
        "per_position": rows,
    }


def first_differing(m: dict) -> dict | None:
    """The first per_position row whose tested row (prefill or decode) is not bit-identical to its reference row
    (by the fingerprints' sha256 where the record has them, else a nonzero max |Δ|); None when every row is."""
    for row in m.get("per_position") or []:
        fp = row.get("fingerprint") if isinstance(row, dict) else None
        tested = fp.get(row.get("source")) if isinstance(fp, dict) else None
        ref = fp.get("reference") if isinstance(fp, dict) else None
        if isinstance(tested, dict) and isinstance(ref, dict):
            if tested.get("sha256") != ref.get("sha256"):
                return row
        elif isinstance(row, dict) and row.get("max_abs_diff") != 0:
            return row
    return None


def equivalence_verdict(m: dict, kv_aligned: int, thresholds: dict, engine: str = "greta") -> tuple[str, str]:
    """The B3.67/B3.69 guardrail: (verdict, one-line reason). Thresholds are inclusive. A peer engine (engine
    not greta, greta.engine.peers) is held to what Greta's kv_aligned=1 gives: decode bit-identical to its own
    prefill at every compared position (PASS_EQUIV), else ENGINE_DRIFT with the figures."""
    figures = (f"max_abs_diff={m['max_abs_diff']:.6g}, p99_abs_diff={m['p99_abs_diff']:.6g}, "
               f"top1_agreement={m['top1_agreement']:.4f}, bit_exact={m['bit_exact']}")
    if not m["finite"]:  # NaN/inf is a failure in either mode, never "expected drift"
        return "FAIL_EQUIV", f"non-finite logits ({figures})"
    if engine != "greta":
        return _peer_verdict(m, engine, figures)
    if not kv_aligned:
        return "EXPECTED_DRIFT", f"kv_aligned=0: each path uses its fastest ops, drift expected ({figures})"
    fails = []
    if m["max_abs_diff"] > thresholds["max_abs_diff"]:
        fails.append(f"max_abs_diff > {thresholds['max_abs_diff']:g}")
    if m["p99_abs_diff"] > thresholds["p99_abs_diff"]:
        fails.append(f"p99_abs_diff > {thresholds['p99_abs_diff']:g}")
    if m["top1_agreement"] < thresholds["top1_agreement"]:
        fails.append(f"top1_agreement < {thresholds['top1_agreement']:g}")
    if fails:
        return "FAIL_EQUIV", f"{'; '.join(fails)} ({figures})"
    return "PASS_EQUIV", f"within thresholds ({figures})"


def _peer_verdict(m: dict, engine: str, figures: str) -> tuple[str, str]:
    """A peer engine's guardrail is bit-exactness (its decode has no tolerance to be judged against)."""
    if m["bit_exact"]:
        return "PASS_EQUIV", f"engine={engine}: its decode is bit-identical to its own prefill at every position ({figures})"
    row = first_differing(m) or {}
    where = f"step {row.get('step')}, position {row.get('position')}" if row else "unknown"
    return "ENGINE_DRIFT", (f"engine={engine}: its decode differs from its own prefill, first at {where} "
                            f"({figures})")
