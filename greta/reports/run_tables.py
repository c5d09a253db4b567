"""Markdown tables and blocks of one run directory for the analysis notebooks (verdict, metrics, top-1, VRAM),
rendered through greta.reports.md / fmt: every value escaped, every number formatted in one place."""
from __future__ import annotations

import json
from pathlib import Path

from greta.reports import fmt, md
from greta.reports.fmt import finite
from greta.reports.run_files import read_json, read_obj_opt, thresholds
from greta.reports.verdict_marks import bundle

__all__ = ["TOP1_COLUMNS", "top1_table", "table_md", "verdict_md", "verdict_display", "report_display",
           "metrics_summary_md", "vram_summary_md"]

TOP1_COLUMNS = ["step", "position", "source", "argmax_decode", "argmax_reference", "agree", "max_abs_diff"]


def top1_table(run_dir: str | Path, metrics: dict | None = None) -> list[dict]:
    """One row per compared step: where the two paths' top-1 token agrees or not. From ``metrics.json`` unless
    ``metrics`` is given."""
    if metrics is None:
        metrics = read_obj_opt(Path(run_dir) / "metrics.json") or {}
    rows = metrics.get("per_position")
    return [{k: r.get(k) for k in TOP1_COLUMNS} for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def table_md(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub-Markdown table of ``rows``; cells by :func:`greta.reports.fmt.cell` (None "—", booleans ✓ / ✗,
    an exact 0 in a |Δ| column "0 (bit-exact)")."""
    if not rows:
        return "_(no rows)_"
    columns = columns or list(rows[0])
    return md.table(columns, [[fmt.cell(r.get(c), c) for c in columns] for r in rows])


def verdict_md(run_dir: str | Path) -> str:
    """The verdict as a prominent markdown block."""
    v = read_obj_opt(Path(run_dir) / "verdict.json")
    if not v:
        return "## Verdict: **missing** — `verdict.json` not found or unreadable"
    lines = [md.heading(2, "Verdict: ", md.bold(v.get("verdict", "?"))), "", "> " + md.text(v.get("reason") or ""), ""]
    extra = [md.line(md.code(k), "=", md.code(json.dumps(v[k]))) for k in ("failed_phase", "bit_exact", "kv_aligned")
             if k in v]
    if extra:
        lines.append(md.line(*extra, sep=" · "))
    return "\n".join(lines)


def _stored_verdict(run_dir) -> str | None:
    v = read_obj_opt(Path(run_dir) / "verdict.json")
    return v.get("verdict") if v and isinstance(v.get("verdict"), str) else None


def verdict_display(run_dir: str | Path) -> dict:
    """verdict_md with the verdict's machine-readable mark (greta.reports.verdict_marks), for
    ``display(..., raw=True)``: greta verify reads the mark, not the text."""
    return bundle(_stored_verdict(run_dir), verdict_md(run_dir))


def report_display(run_dir: str | Path) -> dict:
    """report.md as the run notebook shows it, with the verdict's mark (as verdict_display)."""
    report = Path(run_dir) / "report.md"
    if not report.is_file():
        return bundle(None, md.line("no report.md in", md.code(run_dir)))
    return bundle(_stored_verdict(run_dir), report.read_text(encoding="utf-8"))


def metrics_summary_md(run_dir: str | Path, metrics: dict | None = None) -> str:
    """The scalar part of metrics.json (or of ``metrics``) as a two-column markdown table, then the thresholds."""
    m = metrics if metrics is not None else read_obj_opt(Path(run_dir) / "metrics.json")
    if not m:
        return "_metrics.json not found: no comparison was made in this run._"
    rows = [{"metric": k, "value": fmt.diff(finite(m[k])) if k in fmt.DIFF_KEYS and m[k] is not None else m[k]}
            for k in m if k != "per_position"]
    th = thresholds(run_dir)
    return table_md(rows, ["metric", "value"]) + "\n\n" + md.text(
        f"Thresholds: max_abs_diff ≤ {fmt.threshold(th['max_abs_diff'])}, "
        f"p99_abs_diff ≤ {fmt.threshold(th['p99_abs_diff'])}.")


def vram_summary_md(run_dir: str | Path) -> str:
    """The key figures of vram.json as a markdown table."""
    v = read_json(Path(run_dir) / "vram.json")
    floor = v.get("floor") or {}
    backend = v.get("backend")
    if backend and v.get("fallback_reason"):
        backend = f"{backend} (fallback: {v['fallback_reason']})"
    rows = [
        {"figure": "device", "value": v.get("device_info")},
        {"figure": "backend", "value": backend},
        {"figure": "sampling period", "value": f"{v.get('sampling_period_sec')} s"},
        {"figure": "samples", "value": v.get("samples_count")},
        {"figure": "sampled peak" + (" (process RSS)" if v.get("backend") == "rss" else " (device memory)"), "value": f"{fmt.mb(finite(v.get('peak_vram_mb')))} "
                                            f"@ t={v.get('peak_timestamp_offset_sec')} s"},
        {"figure": "floor (weights + KV)",
         "value": f"{fmt.mb(finite(floor.get('weights_mb')))} + {fmt.mb(finite(floor.get('kv_cache_mb')))} = "
                  f"{fmt.mb(finite(floor.get('total_mb')))}"},
    ]
    for name, pk in (v.get("allocator_peaks") or {}).items():
        rows.append({"figure": f"allocator peak ({name})",
                     "value": f"allocated {fmt.mb(finite(pk.get('max_allocated_mb')))}, "
                              f"reserved {fmt.mb(finite(pk.get('max_reserved_mb')))}"})
    below = md.line(md.bold("⚠ TRUE"), "—", ", ".join(map(str, v.get("below_floor_figures") or [])))
    rows.append({"figure": "below_floor", "value": below if v.get("below_floor") else "false"})
    rows += _rank_rows(v)
    return table_md(rows, ["figure", "value"])


def _rank_rows(v: dict) -> list[dict]:
    """Tensor parallel records: the degree, then one row per rank (the figures above are rank 0's)."""
    ranks = [r for r in v.get("ranks") or [] if isinstance(r, dict)]
    if not ranks:
        return []
    rows = [{"figure": "tensor parallel", "value": f"tp={(v.get('floor') or {}).get('tp', len(ranks))}: every rank "
                                                   "sampled on its own device, held against the per-rank floor; "
                                                   "the figures above are rank 0's"}]
    for r in ranks:
        alloc = [finite((a or {}).get("max_allocated_mb")) for a in (r.get("allocator_peaks") or {}).values()]
        alloc = [a for a in alloc if a is not None]
        state = "⚠ below the floor" if r.get("below_floor") else "at or above the floor"
        rows.append({"figure": f"rank {r.get('rank')}",
                     "value": f"peak {fmt.mb(finite(r.get('peak_vram_mb')))} · allocator max "
                              f"{fmt.mb(max(alloc) if alloc else None)} · {state} · {r.get('device_info')}"})
    return rows
