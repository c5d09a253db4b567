"""The tp-invariance probe as data (no torch): its degrees, how their logits compare, its verdict, its logits
file and its heat map's numbers (docs/TP.md, "The same bits at every degree").

One prompt runs at every tensor-parallel degree 1, 2, .. tp (powers of two), each degree in its own group of
ranks 0..d-1, with the segment tree of S segments (engine tree_segments). Per degree the probe holds three
paths of logits, each row the logits after the token at that absolute position:
  prefill    positions 0 .. ctx-1 (the chunked prefill of the prompt, every position kept),
  decode     positions ctx .. ctx+span-2 (one token at a time, on the first degree's greedy tokens),
  reference  the same positions from the teacher-forced prefill of the prompt and those tokens.
Across degrees every path's rows must be bit-identical to the first degree's (tp=1); within a degree decode
must equal its reference. kv_aligned=1: all of it holds (PASS_TP_INVARIANT) or not (FAIL_TP_INVARIANT; its
negative control, perturb=tp_plain_order, is today's per-rank K order); kv_aligned=0: measured (TP_DRIFT).
"""
from __future__ import annotations

import numpy as np

from greta.record.fingerprints import row_fingerprint

TP_VERDICTS = ("PASS_TP_INVARIANT", "FAIL_TP_INVARIANT", "TP_DRIFT")
LOGITS_FILE = "tp_logits.npz"
PATHS = ("prefill", "decode", "reference")
CONTROL = "tp_plain_order"  # the perturb that turns the tree off: each rank's own K loop, partials added by rank
FLT_MAX = float(np.finfo(np.float32).max)  # a non-finite difference is stored as this (JSON has no inf)


def degrees_of(tp: int) -> list[int]:
    """The degrees the probe compares at tp ranks: 1, then the powers of two below tp that divide it, then tp
    (1, 2, 4, 8 at tp=8; 1, 3 at tp=3, SmolLM2's odd degree); the first is the reference."""
    return [d for d in (1, 2, 4) if d < tp and tp % d == 0] + [tp]


def first_positions(ctx: int) -> dict[str, int]:
    """The absolute position of each path's first row."""
    return {"prefill": 0, "decode": ctx, "reference": ctx}


def row_diffs(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (max |Δ| in float64, bit-identical), of two fp32 arrays [rows, V]; NaN counts as a difference
    (and as FLT_MAX in |Δ|), -0.0 against 0.0 too (bits are compared)."""
    if ref.shape != got.shape:
        raise ValueError(f"logits of shape {tuple(got.shape)} cannot be compared with {tuple(ref.shape)}")
    a, b = (np.ascontiguousarray(x, dtype=np.float32) for x in (ref, got))
    same = (a.view(np.uint32) == b.view(np.uint32)).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.abs(a.astype(np.float64) - b.astype(np.float64))
    delta = np.minimum(np.nan_to_num(delta, nan=FLT_MAX, posinf=FLT_MAX), FLT_MAX)
    return (delta.max(axis=1) if delta.size else np.zeros(len(a))), same


def path_diff(ref: np.ndarray, got: np.ndarray, first_pos: int) -> dict:
    """One path at one degree against the same path at the reference: max |Δ|, the first differing absolute
    position (None: none), bit_exact, and max |Δ| per position (the heat map's row)."""
    per_row, same = row_diffs(ref, got)
    differ = np.flatnonzero(~same)
    return {"max_abs_diff": float(per_row.max()) if per_row.size else 0.0,
            "first_diff_pos": int(differ[0]) + first_pos if differ.size else None,
            "bit_exact": not differ.size, "per_position": [float(v) for v in per_row]}


def within_diff(decode: np.ndarray, reference: np.ndarray, ctx: int) -> dict:
    """Decode against its teacher-forced reference at one degree (B3.77's check, at each degree)."""
    d = path_diff(reference, decode, ctx)
    return {k: d[k] for k in ("max_abs_diff", "first_diff_pos", "bit_exact")}


def fingerprints(logits: dict) -> dict:
    """{str(tp): {path: [row fingerprint per position]}}: sha256 and top-k of every row, so bit_exact is
    checked without the logits file (greta verify)."""
    return {str(d): {path: [row_fingerprint(r) for r in logits[path][d]] for path in PATHS} for d in logits["degrees"]}


def _across(logits: dict, ctx: int) -> list[dict]:
    ref = logits["degrees"][0]
    first = first_positions(ctx)
    rows = []
    for d in logits["degrees"][1:]:
        paths = {path: path_diff(logits[path][ref], logits[path][d], first[path]) for path in PATHS}
        rows.append({"tp": d, **paths, "max_abs_diff": max(p["max_abs_diff"] for p in paths.values()),
                     "bit_exact": all(p["bit_exact"] for p in paths.values())})
    return rows


def _pairs(logits: dict) -> list[list]:
    """[tp_i, tp_j, max |Δ| over every path and position]: the degree x degree matrix, upper triangle."""
    ds = logits["degrees"]
    out = []
    for i, a in enumerate(ds):
        for b in ds[i + 1:]:
            out.append([a, b, max(float(row_diffs(logits[p][a], logits[p][b])[0].max(initial=0.0)) for p in PATHS)])
    return out


def tp_metrics(logits: dict, ctx: int) -> dict:
    """metrics.json of a tp-invariance record from {"degrees": [..], path: {tp: fp32 [rows, V]}}: the worst
    figures at the top (max_abs_diff, bit_exact over every degree and path), then per degree."""
    across = _across(logits, ctx)
    within = [{"tp": d, **within_diff(logits["decode"][d], logits["reference"][d], ctx)} for d in logits["degrees"]]
    finite = all(np.isfinite(logits[p][d]).all() for p in PATHS for d in logits["degrees"])
    worst = max(across + within, key=lambda r: r["max_abs_diff"])
    first = _first_difference(across, within)
    return {"degrees": list(logits["degrees"]), "reference_tp": logits["degrees"][0], "ctx": ctx,
            "span": len(logits["decode"][logits["degrees"][0]]) + 1, "vocab": int(logits["prefill"][logits["degrees"][0]].shape[1]),
            "finite": bool(finite), "max_abs_diff": worst["max_abs_diff"],
            "bit_exact": bool(finite and all(r["bit_exact"] for r in across + within)),
            "first_difference": first, "across": across, "within": within, "pairs": _pairs(logits),
            "fingerprints": fingerprints(logits)}


def _first_difference(across: list[dict], within: list[dict]) -> dict | None:
    """The first difference found, in the order degrees then paths: {"tp", "path", "position"} (None: none)."""
    for r in across:
        for path in PATHS:
            if not r[path]["bit_exact"]:
                return {"tp": r["tp"], "path": path, "position": r[path]["first_diff_pos"]}
    for r in within:
        if not r["bit_exact"]:
            return {"tp": r["tp"], "path": "decode vs reference", "position": r["first_diff_pos"]}
    return None


def tp_verdict(m: dict, kv_aligned: int) -> tuple[str, str]:
    """(verdict, one-line reason) from tp_metrics' dict."""
    figures = (f"max_abs_diff={m['max_abs_diff']:.6g}, bit_exact={m['bit_exact']}, degrees "
               f"{', '.join(map(str, m['degrees']))}")
    if not m["finite"]:
        return "FAIL_TP_INVARIANT", f"non-finite logits ({figures})"
    if not kv_aligned:
        return "TP_DRIFT", f"kv_aligned=0: no tree, the library's reductions; the differences measured ({figures})"
    if m["bit_exact"]:
        return "PASS_TP_INVARIANT", (f"every prefill, decode and reference logit bit-identical at every degree, and "
                                     f"decode equal to its prefill within each ({figures})")
    f = m["first_difference"]
    return "FAIL_TP_INVARIANT", f"tp={f['tp']} {f['path']} differs first at position {f['position']} ({figures})"


def fingerprint_problems(m: dict) -> list[str]:
    """metrics.json's bit_exact against its own fingerprints: equal hashes at every degree and position (and
    decode's against its reference's) exactly when it says bit_exact (a finite record)."""
    fps, degrees = m.get("fingerprints"), m.get("degrees")
    try:
        ref = fps[str(degrees[0])]
        equal = all(a["sha256"] == b["sha256"] for d in degrees[1:] for p in PATHS
                    for a, b in zip(ref[p], fps[str(d)][p], strict=True))
        equal = equal and all(a["sha256"] == b["sha256"] for d in degrees
                              for a, b in zip(fps[str(d)]["decode"], fps[str(d)]["reference"], strict=True))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        return [f"metrics.json fingerprints are not complete for every degree and path ({type(e).__name__}: {e})"]
    if m.get("bit_exact") != (equal and bool(m.get("finite"))):
        return [f"metrics.json bit_exact is {m.get('bit_exact')} but the fingerprints say the degrees are "
                + ("bit-identical" if equal else "not bit-identical")]
    return []


def logits_arrays(logits: dict) -> dict:
    """tp_logits.npz: the reference degree's paths in full (fp32 [rows, V]); every other degree's as the XOR of
    its bits with the reference's (uint32: all zero where bit-identical, so a passing record stores them in
    almost no space, and each is recovered exactly as reference ^ xor)."""
    ds = logits["degrees"]
    out = {"degrees": np.array(ds, dtype=np.int64)}
    for p in PATHS:
        ref = np.ascontiguousarray(logits[p][ds[0]], dtype=np.float32)
        out[p] = ref
        for d in ds[1:]:
            out[f"{p}_xor_tp{d}"] = np.ascontiguousarray(logits[p][d], dtype=np.float32).view(np.uint32) ^ ref.view(np.uint32)
    return out


def logits_from_arrays(arrays: dict) -> dict:
    """logits_arrays' inverse: {"degrees": [..], path: {tp: fp32 [rows, V]}}."""
    ds = [int(d) for d in arrays["degrees"].tolist()]
    out: dict = {"degrees": ds}
    for p in PATHS:
        ref = arrays[p]
        out[p] = {ds[0]: ref, **{d: (ref.view(np.uint32) ^ arrays[f"{p}_xor_tp{d}"]).view(np.float32) for d in ds[1:]}}
    return out


def heatmap(m: dict) -> tuple[list[int], list[int], np.ndarray]:
    """The degree x position heat map's data: (the degrees compared with the reference, the absolute
    positions (prefill's, then decode's), max |Δ| per position [degrees, positions], prefill and decode paths)."""
    rows = m["across"]
    ctx, n_dec = m["ctx"], len(rows[0]["decode"]["per_position"]) if rows else 0
    positions = list(range(ctx)) + list(range(ctx, ctx + n_dec))
    grid = np.array([r["prefill"]["per_position"] + r["decode"]["per_position"] for r in rows], dtype=np.float64)
    return [r["tp"] for r in rows], positions, grid.reshape(len(rows), len(positions))
