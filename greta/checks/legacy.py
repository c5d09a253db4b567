"""The original engine's traces, re-analyzed with Greta's metrics and verdicts.

    rows = read_runs("old-engine/runs"); print(table_md(rows))      # or: python -m greta legacy old-engine/runs

Two layouts are recognized under a ``runs/`` folder (the folder itself, or one holding ``runs/``):

``b3_67`` (the B3.67 matrix, kv_aligned x seeds)::

    runs/kv_aligned_<K>/seed_<S>/prefill/{metadata.json, logits.jsonl.gz}
    runs/kv_aligned_<K>/seed_<S>/decode/{metadata.json, logits.jsonl.gz}

``b3_77`` (per-context runs)::

    runs/kv_<K>/seed_<S>/ctx_<N>/prefill/{metadata.json, logits.jsonl.gz}
    runs/kv_<K>/seed_<S>/ctx_<N>/decode/{metadata.json, logits.jsonl.gz}

File contents (what Greta reads; other keys are ignored):

``metadata.json``
    a JSON object with ``ctx`` (int), ``kv_aligned`` (0/1), ``seed`` (int), ``span`` (int, the compared
    steps); optional ``peak_vram_mb`` (number) and ``model`` (str). ``kv_aligned``/``seed``/``ctx`` must agree
    with the directory names and between ``prefill/`` and ``decode/``.
``logits.jsonl.gz``
    gzip-compressed JSON lines, one per compared step: ``{"step": j, "logits": [float, ...]}``, optionally
    ``"position"`` (default ``ctx - 1 + j``) and ``"token"`` (the token generated at the step; default: the
    decode logits' argmax). Steps must be 0..span-1, each once. ``prefill/`` holds the prefill path's logits
    for those positions (Greta's *reference*), ``decode/`` the decode path's (Greta's *decode*).

Each trace point becomes Greta's analysis inputs (float32 ``decode``/``reference`` arrays ``[span, vocab]``,
tokens, positions), then :func:`greta.record.metrics.compare` and :func:`greta.record.metrics.equivalence_verdict` with the
default thresholds. Nothing here raises for a bad trace: a row's ``status`` is ``OK``, ``MISSING`` (a file is
absent), ``CORRUPT`` (unreadable gzip/JSON, missing or non-numeric fields) or ``MISMATCH`` (metadata vs
directory names, prefill vs decode, steps vs span, vocab sizes), with one-line ``reasons``.
"""
from __future__ import annotations

import gzip
import itertools
import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np

from greta.checks.analyze import _err, _line
from greta.record.files import RecordFileError, read_json_obj
from greta.record.metrics import compare, equivalence_verdict
from greta.record.params import DEFAULTS
from greta.reports import fmt, md
from greta.terminal import shown

__all__ = ["find_points", "read_point", "read_runs", "table_md", "main"]

LAYOUTS = {"b3_67": re.compile(r"^kv_aligned_(\d+)/seed_(\d+)$"), "b3_77": re.compile(r"^kv_(\d+)/seed_(\d+)/ctx_(\d+)$")}


class _Bad(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


def find_points(runs_dir) -> list[dict]:
    """Trace points under runs_dir: [{layout, path, kv_aligned, seed, ctx (b3_77 only)}], sorted."""
    root = Path(runs_dir)
    if (root / "runs").is_dir():
        root = root / "runs"
    found = []
    for d in itertools.chain(root.glob("*/*"), root.glob("*/*/*")):
        if not d.is_dir():
            continue
        rel = d.relative_to(root).as_posix()
        for layout, rx in LAYOUTS.items():
            m = rx.match(rel)
            if m:
                pt = {"layout": layout, "path": str(d), "kv_aligned": int(m[1]), "seed": int(m[2]),
                      "ctx": int(m[3]) if rx.groups >= 3 else None}  # the older layout names no ctx
                found.append(pt)
    # the path breaks ties (kv_aligned_1 and kv_aligned_01 are one point twice), so the order never follows the disk's
    return sorted(found, key=lambda p: (p["layout"], p["ctx"] or 0, p["kv_aligned"], p["seed"], p["path"]))


def _metadata(d: Path) -> dict:
    p = d / "metadata.json"
    if not p.is_file():
        raise _Bad("MISSING", f"{p} is missing")
    try:
        m = read_json_obj(p)
    except (OSError, RecordFileError) as e:  # unreadable, not JSON, or not an object
        raise _Bad("CORRUPT", f"{p.parent}/{e}") from None
    for k in ("ctx", "kv_aligned", "seed", "span"):
        if not isinstance(m.get(k), int) or isinstance(m.get(k), bool):
            raise _Bad("CORRUPT", f"{p} lacks an integer {k!r}")
    return m


def _logits(d: Path, span: int) -> tuple[np.ndarray, list, list]:
    """(logits [span, vocab], positions (None where absent), tokens (None where absent))."""
    p = d / "logits.jsonl.gz"
    if not p.is_file():
        raise _Bad("MISSING", f"{p} is missing")
    rows = {}
    try:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except ValueError as e:
                    raise _Bad("CORRUPT", f"{p} line {n} is not JSON ({e})") from None
                if not isinstance(r, dict) or not isinstance(r.get("step"), int) or not isinstance(r.get("logits"), list):
                    raise _Bad("CORRUPT", f"{p} line {n} lacks an integer 'step' and a 'logits' list")
                if r["step"] in rows:
                    raise _Bad("MISMATCH", f"{p}: step {r['step']} appears twice")
                rows[r["step"]] = r
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise _Bad("CORRUPT", f"{p} is not a readable gzip file: {type(e).__name__}: {e}") from None
    if sorted(rows) != list(range(span)):
        raise _Bad("MISMATCH", f"{p} has steps {sorted(rows)[:8]}{'...' if len(rows) > 8 else ''}; metadata span is {span} (steps 0..{span - 1})")
    try:
        arr = np.array([rows[j]["logits"] for j in range(span)], dtype=np.float32)
    except (ValueError, TypeError):
        raise _Bad("CORRUPT", f"{p}: logits are not equal-length lists of numbers") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise _Bad("CORRUPT", f"{p}: logits are not equal-length lists of numbers")
    return arr, [rows[j].get("position") for j in range(span)], [rows[j].get("token") for j in range(span)]


def read_point(pt: dict, thresholds: dict | None = None) -> dict:
    """One trace point -> a row: the point's keys plus status, reasons, metrics, verdict, peak_vram_mb."""
    row = {**pt, "status": "OK", "reasons": [], "metrics": None, "verdict": None, "verdict_reason": None,
           "peak_vram_mb": None, "max_abs_diff": None, "top1_agreement": None, "span": None}
    d = Path(pt["path"])
    try:
        meta = {ph: _metadata(d / ph) for ph in ("prefill", "decode")}
        for ph, m in meta.items():
            want = {"kv_aligned": pt["kv_aligned"], "seed": pt["seed"], **({"ctx": pt["ctx"]} if pt["ctx"] is not None else {})}
            bad = {k: m[k] for k, v in want.items() if m[k] != v}
            if bad:
                raise _Bad("MISMATCH", f"{ph}/metadata.json says {bad}, the directory names say {want}")
        diff = [k for k in ("ctx", "kv_aligned", "seed", "span") if meta["prefill"][k] != meta["decode"][k]]
        if diff:
            raise _Bad("MISMATCH", f"prefill and decode metadata differ in {', '.join(diff)}")
        ctx, span = meta["decode"]["ctx"], meta["decode"]["span"]
        row["ctx"], row["span"] = ctx, span
        if span < 1:
            raise _Bad("CORRUPT", f"metadata span={span} must be >= 1")
        peaks = [m.get("peak_vram_mb") for m in meta.values() if isinstance(m.get("peak_vram_mb"), (int, float))]
        row["peak_vram_mb"] = max(peaks) if peaks else None
        ref, ref_pos, _ = _logits(d / "prefill", span)
        dec, dec_pos, dec_tok = _logits(d / "decode", span)
        if ref.shape != dec.shape:
            raise _Bad("MISMATCH", f"vocab differs: prefill logits {ref.shape}, decode logits {dec.shape}")
        positions = [p if isinstance(p, int) else ctx - 1 + j for j, p in enumerate(dec_pos)]
        if any(isinstance(p, int) and p != q for p, q in zip(ref_pos, positions)):
            raise _Bad("MISMATCH", "prefill and decode logits are at different positions")
        tokens = [t if isinstance(t, int) else int(np.argmax(dec[j])) for j, t in enumerate(dec_tok)]
        sources = ["prefill"] + ["decode"] * (span - 1)
        m = compare(dec, ref, tokens, positions, sources)
        v, why = equivalence_verdict(m, pt["kv_aligned"], thresholds or DEFAULTS["thresholds"])
        row.update(metrics=m, verdict=v, verdict_reason=why, max_abs_diff=m["max_abs_diff"],
                   top1_agreement=m["top1_agreement"])
        if not m["finite"]:
            row["reasons"].append("non-finite logits in the trace (judged FAIL_EQUIV)")
    except _Bad as e:
        row["status"], row["reasons"] = e.status, [_line(e)]
    except Exception as e:  # noqa: BLE001 - a trace we did not foresee is a reason, never a traceback
        row["status"], row["reasons"] = "CORRUPT", [_err(e)]
    return row


def read_runs(runs_dir, thresholds: dict | None = None) -> list[dict]:
    return [read_point(pt, thresholds) for pt in find_points(runs_dir)]


def table_md(rows: list[dict]) -> str:
    """The seed's results table, one row per trace point, plus seed, layout and trace status."""
    return md.table(["Context", "KV", "Peak VRAM (MB)", "Max Logits Diff", "Top-1 Agreement", "Verdict", "Seed",
                     "Layout", "Trace"],
                    [[fmt.num(r["ctx"], "{}"), r["kv_aligned"], fmt.num(r["peak_vram_mb"], "{:.0f}"),
                      fmt.num(r["max_abs_diff"], "{:.6f}"), fmt.num(r["top1_agreement"], "{:.4f}"),
                      r["verdict"] or fmt.NONE, r["seed"], r["layout"], r["status"]] for r in rows])


def main(runs_dir, as_json: bool = False) -> int:
    """`python -m greta legacy <runs-dir>`: 0 every trace read, 1 some unreadable, 2 no traces there."""
    if not Path(runs_dir).is_dir():
        print(shown(f"greta: error: {runs_dir} is not a directory"), file=sys.stderr)
        return 2
    rows = read_runs(runs_dir)
    if not rows:
        print(shown(f"greta: error: no traces under {runs_dir} (expected runs/kv_aligned_<K>/seed_<S>/ or "
                    "runs/kv_<K>/seed_<S>/ctx_<N>/, each with prefill/ and decode/)"), file=sys.stderr)
        return 2
    if as_json:
        print(shown(json.dumps([{k: v for k, v in r.items() if k != "metrics"} for r in rows], indent=2), lines=True))
    else:
        print(shown(table_md(rows), lines=True))
        for r in rows:
            for reason in r["reasons"]:
                print(shown(f"- {r['path']}: {r['status']}: {reason}"))
    return 0 if all(r["status"] == "OK" for r in rows) else 1
