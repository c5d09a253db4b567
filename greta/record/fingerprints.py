"""Fingerprints of the logits, kept in metrics.json so a record can be re-checked without its logits.npz.

Per compared position (metrics.json per_position[j]["fingerprint"]), for each path that produced that row
(its `source`: "prefill" for step 0, "decode" after) and for "reference": the sha256 of the row's float32
bytes (little-endian, as logits.npz stores them), and its top-k vocabulary ids and values (the largest first,
ties to the lower id, as argmax breaks them).

    fingerprint_rows(decode, reference, sources)   # the per-position fingerprints compare() stores
    problems(metrics)                              # what does not fit: [] when consistent or absent

Equal hashes mean equal bits (a sha256 collision aside), so `bit_exact` must be true exactly when the
logits are finite and every position's hashes are equal; the top-1 ids must be the stored argmaxes and
give the stored top-1 agreement. A record made before fingerprints existed has none and is not checked.
"""
from __future__ import annotations

import hashlib

import numpy as np

TOP_K = 8
REFERENCE = "reference"


def row_fingerprint(row: np.ndarray, k: int = TOP_K) -> dict:
    """{"sha256", "top_ids", "top_values"} of one row of logits."""
    r = np.ascontiguousarray(row, dtype="<f4")
    top = np.argsort(-r, kind="stable")[:k]  # stable: among equal values the lower id first, as argmax
    return {"sha256": hashlib.sha256(r.tobytes()).hexdigest(), "top_ids": [int(i) for i in top],
            "top_values": [float(v) for v in r[top]]}


def fingerprint_rows(decode: np.ndarray, reference: np.ndarray, sources: list[str]) -> list[dict]:
    """Per position j: {sources[j]: fingerprint of decode[j], "reference": fingerprint of reference[j]}."""
    return [{sources[j]: row_fingerprint(decode[j]), REFERENCE: row_fingerprint(reference[j])}
            for j in range(len(decode))]


def _tested(row: dict) -> dict | None:
    """The fingerprint of the tested path (prefill or decode) of one per_position row."""
    fp = row.get("fingerprint")
    path = row.get("source")
    return fp.get(path) if isinstance(fp, dict) and isinstance(fp.get(path), dict) else None


def problems(metrics: dict) -> list[str]:
    """Where metrics.json's figures disagree with its fingerprints (one line each); [] when they agree or the
    record has no fingerprints."""
    rows = metrics.get("per_position")
    if not isinstance(rows, list) or not any(isinstance(r, dict) and "fingerprint" in r for r in rows):
        return []
    errors, equal, agree, finite = [], [], [], bool(metrics.get("finite"))
    for j, row in enumerate(rows):
        tested = _tested(row) if isinstance(row, dict) else None
        ref = row.get("fingerprint", {}).get(REFERENCE) if tested is not None else None
        if not (isinstance(ref, dict) and all(isinstance(fp.get("sha256"), str) and isinstance(fp.get("top_ids"), list)
                                              and fp["top_ids"] for fp in (tested, ref))):
            return [f"metrics.json per_position step {j} has no complete fingerprint of its {row.get('source')!r} "
                    "and reference rows"]
        equal.append(tested["sha256"] == ref["sha256"])
        agree.append(tested["top_ids"][0] == ref["top_ids"][0])
        if finite and (tested["top_ids"][0], ref["top_ids"][0]) != (row.get("argmax_decode"), row.get("argmax_reference")):
            errors.append(f"metrics.json step {j}: the stored argmaxes are not the fingerprints' top-1 ids")
    want = finite and all(equal)
    if metrics.get("bit_exact") != want:
        unequal = [j for j, e in enumerate(equal) if not e]
        errors.append(f"metrics.json bit_exact is {metrics.get('bit_exact')} but the fingerprints say "
                      + (f"the paths differ at step(s) {', '.join(map(str, unequal[:8]))}" if unequal else
                         "every position is bit-identical" + ("" if metrics.get("finite") else ", with non-finite logits")))
    if finite and metrics.get("top1_agreement") != sum(agree) / len(agree):
        errors.append(f"metrics.json top1_agreement is {metrics.get('top1_agreement')} but the fingerprints' top-1 ids "
                      f"agree at {sum(agree)} of {len(agree)} positions")
    return errors
