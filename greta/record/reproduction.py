"""A reproduction as data (no torch): does a re-run on this machine give the bits a record holds?

`greta reproduce` (greta.checks.reproduce) re-runs a record from its params.json, then compares:
  - the environment that defines the bits (ENVIRONMENT: device model, GPU driver, CUDA/ROCm, torch, triton,
    BLAS, and the CPU model when the run was on the CPU; numpy and Python shown, not deciding) and the inputs
    (INPUTS: the model's weights hash and the prompt's token ids hash), as each metadata.json records them: a
    field the original records that differs here makes the two runs NOT_COMPARABLE (different bits are then
    no finding, equal ones no proof); a field it does not record is named as not compared;
  - the logits bit for bit when both records hold their logits file (every array, row by row);
  - else the fingerprints (greta.record.fingerprints: per position and path, the sha256 and top-k; the rows each
    probe kind's fingerprint_rows gives, a batch record's per request).

    env = environment_differences(orig_meta, rerun_meta, device)    # {"differs": [...], "unrecorded": [...]}
    cmp = compare_fingerprints(orig_rows, rerun_rows)                # or compare_logits(orig, rerun, sources)
    verdict, reason = judge(env, cmp)

REPRODUCED: the environment matches and every compared bit is equal. DIFFERS: the environment matches and a
bit differs (the first phase/path and position are named, with max |Δ| from logits, or the first differing
top-k entry from fingerprints), or the re-run did not finish. NOT_COMPARABLE: the environment or the inputs
differ, or the original holds nothing to compare (no logits, no fingerprints).
"""
from __future__ import annotations

import numpy as np

from greta.record.fingerprints import REFERENCE

REPRODUCTION_VERDICTS = ("REPRODUCED", "DIFFERS", "NOT_COMPARABLE")
REPRODUCTION_FILE = "reproduction.json"
FORMAT = 1


def _get(meta: dict, *keys):
    for k in keys:
        meta = meta.get(k) if isinstance(meta, dict) else None
    return meta


def _records(meta: dict, *keys) -> bool:
    """metadata.json holds that key (null included: e.g. no HIP version on a CUDA build is a recorded fact)."""
    for k in keys:
        if not isinstance(meta, dict) or k not in meta:
            return False
        meta = meta[k]
    return True


# (label, where metadata.json holds it, applies to the device: "any" | "cpu" | "gpu", decides comparability).
# numpy and Python do not compute the logits (torch does; numpy only stores and hashes them): shown, not deciding.
ENVIRONMENT = (
    ("device model", ("device_name",), "any", True),
    ("GPU driver", ("machine", "gpu_driver"), "gpu", True),
    ("CUDA", ("versions", "cuda"), "gpu", True),
    ("ROCm (HIP)", ("versions", "hip"), "gpu", True),
    ("torch", ("versions", "torch"), "any", True),
    ("triton", ("versions", "triton"), "any", True),
    ("BLAS", ("machine", "blas"), "any", True),
    ("CPU model", ("machine", "cpu_model"), "cpu", True),
    ("numpy", ("versions", "numpy"), "any", False),
    ("Python", ("versions", "python"), "any", False),
)
INPUTS = (
    ("model weights (model_hash)", ("model_hash",)),
    ("prompt token ids (prompt_ids_sha256)", ("prompt", "prompt_ids_sha256")),
)


def environment_differences(original: dict, here: dict, device: str) -> dict:
    """What differs between two metadata.json dicts in the fields that define the bits.

    -> {"fields": [{"field", "original", "here", "same", "decides"}] (each field the original records),
        "differs": [labels of deciding fields that differ], "unrecorded": [labels the original does not record,
        so they cannot be compared]}"""
    on = "cpu" if str(device).startswith("cpu") else "gpu"
    rows, unrecorded = [], []
    spec = [(label, keys, applies, decides) for label, keys, applies, decides in ENVIRONMENT]
    spec += [(label, keys, "any", True) for label, keys in INPUTS]
    for label, keys, applies, decides in spec:
        if applies not in ("any", on):
            continue
        if not _records(original, *keys):
            unrecorded.append(label)
            continue
        a, b = _get(original, *keys), _get(here, *keys)
        rows.append({"field": label, "original": a, "here": b, "same": a == b, "decides": decides})
    return {"fields": rows, "differs": differing_fields(rows), "unrecorded": unrecorded}


def differing_fields(rows: list[dict]) -> list[str]:
    """The deciding fields whose two values differ (recomputed from the values, not from a stored flag)."""
    return [r["field"] for r in rows if r.get("decides", True) and r["original"] != r["here"]]


def _paths(row: dict) -> list[str]:
    """The paths of one per_position row, the tested one (prefill or decode) before the reference."""
    fp = row.get("fingerprint") or {}
    return sorted(fp, key=lambda p: (p == REFERENCE, p))


def _first_topk(a: dict, b: dict) -> dict | None:
    """The first top-k entry (rank, [id, value] of each) where two fingerprints differ; None if all agree."""
    ta = list(zip(a.get("top_ids") or [], a.get("top_values") or []))
    tb = list(zip(b.get("top_ids") or [], b.get("top_values") or []))
    for i in range(max(len(ta), len(tb))):
        x, y = (list(ta[i]) if i < len(ta) else None), (list(tb[i]) if i < len(tb) else None)
        if x != y:
            return {"rank": i, "original": x, "here": y}
    return None


def compare_fingerprints(original: list[dict], here: list[dict]) -> dict:
    """Per position and path, the sha256 of the original's logits against the re-run's.

    original, here: rows {"step", "position", "fingerprint": {path: row fingerprint}}, with "request" where the
    record holds several (greta.probe.kinds: fingerprint_rows).
    -> {"by": "fingerprints", "positions", "equal": bool, "differing": {path: positions that differ},
        "first": None or {"path", "step", "position", "top_k": first differing top-k entry or None, and
        "request" when the rows name one}}"""
    differing: dict[str, int] = {}
    first = None
    if len(original) != len(here):
        return {"by": "fingerprints", "positions": len(original), "equal": False, "differing": {},
                "first": {"path": "span", "step": min(len(original), len(here)), "position": None, "top_k": None,
                          "note": f"the original compares {len(original)} positions, the re-run {len(here)}"}}
    for j, (ro, rh) in enumerate(zip(original, here)):
        for path in _paths(ro):
            a, b = ro["fingerprint"].get(path), (rh.get("fingerprint") or {}).get(path)
            if isinstance(a, dict) and isinstance(b, dict) and a.get("sha256") == b.get("sha256"):
                continue
            differing[path] = differing.get(path, 0) + 1
            if first is None:
                first = {"path": path, "step": ro.get("step", j), "position": ro.get("position"),
                         "top_k": _first_topk(a or {}, b or {}), **({"request": ro["request"]} if "request" in ro else {})}
    return {"by": "fingerprints", "positions": len(original), "equal": first is None, "differing": differing,
            "first": first}


def _bits(x: np.ndarray) -> np.ndarray:
    """The array's bits as unsigned integers of its width (floats compared bit for bit: -0.0 != 0.0, NaN
    payloads count); anything else as it is."""
    if x.dtype.kind == "f":
        return x.view(f"u{x.dtype.itemsize}")
    return x


def _array_difference(name: str, a: np.ndarray, b: np.ndarray) -> dict | None:
    """None when a and b are the same bits; else the first differing row (index along the first axis), the
    rows that differ and max |Δ| (floats of one shape)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return {"array": name, "row": 0, "rows": None, "max_abs_diff": None,
                "note": f"shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}"}
    if np.array_equal(_bits(a), _bits(b)):
        return None
    ne = _bits(a) != _bits(b)
    rows = np.flatnonzero(ne.reshape(ne.shape[0], -1).any(axis=1)) if ne.ndim else np.array([0])
    out = {"array": name, "row": int(rows[0]), "rows": int(rows.size), "max_abs_diff": None}
    if a.dtype.kind == "f":
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        out["max_abs_diff"] = float(np.nanmax(d)) if np.isfinite(d).any() else float("nan")
    return out


def compare_logits(original: dict, here: dict, row_path=None) -> dict:
    """Every array of the original's logits file against the re-run's, bit for bit. row_path(array, row) names
    the phase/path of a row (B3.77's "decode" array: prefill at row 0, decode after; "reference").

    -> {"by": "logits", "arrays", "equal", "differing": {path: rows}, "first": None or {"path", "array", "step",
        "max_abs_diff"}, "max_abs_diff": over every differing float array}"""
    row_path = row_path or (lambda name, row: name)
    diffs = []
    for name in sorted(set(original) | set(here)):
        if name not in original or name not in here:
            diffs.append({"array": name, "row": 0, "rows": None, "max_abs_diff": None,
                          "note": f"only the {'original' if name in original else 're-run'} holds it"})
            continue
        d = _array_difference(name, np.asarray(original[name]), np.asarray(here[name]))
        diffs += [d] if d else []
    differing: dict[str, int] = {}
    for d in diffs:
        differing[row_path(d["array"], d["row"])] = differing.get(row_path(d["array"], d["row"]), 0) + (d["rows"] or 1)
    first = None
    if diffs:  # the earliest row; at one row, the tested path before the reference
        d = min(diffs, key=lambda d: (d["row"], row_path(d["array"], d["row"]) == REFERENCE, d["array"]))
        first = {"path": row_path(d["array"], d["row"]), "array": d["array"], "step": d["row"],
                 "max_abs_diff": d["max_abs_diff"], **({"note": d["note"]} if "note" in d else {})}
    worst = [d["max_abs_diff"] for d in diffs if d["max_abs_diff"] is not None]
    return {"by": "logits", "arrays": sorted(original), "equal": not diffs, "differing": differing, "first": first,
            "max_abs_diff": max(worst) if worst else (None if diffs else 0.0)}


def describe_first(cmp: dict) -> str:
    """One line: where the first difference is (phase/path, step/position, max |Δ| or the top-k entry)."""
    f = cmp.get("first")
    if not f:
        return "no difference"
    at = (f"request {f['request']} " if f.get("request") is not None else "") + f"{f['path']} at step {f['step']}"
    at += f" (position {f['position']})" if f.get("position") is not None else ""
    if f.get("note"):
        return f"{at}: {f['note']}"
    if cmp["by"] == "logits":
        return f"{at}, array {f['array']}: max |Δ| {f['max_abs_diff']:.6g} (over all: {cmp['max_abs_diff']:.6g})"
    t = f.get("top_k")
    if t is None:
        return f"{at}: the sha256 differs, the top-k ids and values agree (the difference lies outside the top-k)"
    return (f"{at}: top-k entry #{t['rank']} is [id, value] {t['original']} in the original, {t['here']} here")


def judge(env: dict | None, cmp: dict | None, nothing: str | None = None, rerun_fault: str | None = None) -> tuple[str, str]:
    """(verdict, one-line reason) of a reproduction from its stored data (so verify can recompute it).
    nothing: why there is nothing to compare (the re-run was then skipped); rerun_fault: how the re-run ended
    when it produced no logits."""
    if nothing:
        return "NOT_COMPARABLE", nothing
    differs = differing_fields(env["fields"]) if env else []
    if differs:
        bits = "" if cmp is None else ("; the bits happen to be equal" if cmp["equal"] else
                                        f"; the bits differ ({describe_first(cmp)})")
        return "NOT_COMPARABLE", f"the environment differs: {', '.join(differs)}{bits}"
    if rerun_fault:
        return "DIFFERS", f"the re-run did not finish: {rerun_fault}"
    if cmp is None:
        return "NOT_COMPARABLE", "nothing was compared"
    if cmp["equal"]:
        return "REPRODUCED", f"every compared bit is equal ({cmp['by']}: {_extent(cmp)})"
    paths = ", ".join(f"{p} ({n})" for p, n in cmp["differing"].items())
    return "DIFFERS", f"first difference: {describe_first(cmp)}; differing {'rows' if cmp['by'] == 'logits' else 'positions'} by path: {paths}"


def _extent(cmp: dict) -> str:
    if cmp["by"] == "logits":
        return f"arrays {', '.join(cmp['arrays'])}"
    return f"{cmp['positions']} positions, each path's sha256"


def judge_sweep(points: list[dict]) -> tuple[str, str]:
    """The summary verdict of a sweep's reproduction from its points' verdicts: DIFFERS if any point differs,
    else NOT_COMPARABLE if any is not comparable, else REPRODUCED."""
    for verdict in ("DIFFERS", "NOT_COMPARABLE"):
        hit = [p for p in points if p["verdict"] == verdict]
        if hit:
            return verdict, (f"{len(hit)} of {len(points)} points {verdict}: {', '.join(p['name'] for p in hit)} "
                             f"(the first: {hit[0]['reason']})")
    return "REPRODUCED", f"every one of the {len(points)} points reproduced"


def judge_body(body: dict) -> tuple[str, str]:
    """The verdict reproduction.json's stored data give: a sweep's from its points, a record's from its
    comparison."""
    if "points" in body:
        return judge_sweep(body["points"])
    return judge(body.get("environment"), body.get("comparison"), body.get("skipped"), body.get("rerun_fault"))
