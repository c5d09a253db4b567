"""The tp-invariance probe's sweep-report section (greta.probe.kinds: its sweep_sections): one row per point
with its largest |Δlogit| across degrees and its verdict. The rows are greta.sweeps.report.collect's.

    sections = sweep_sections(rows, fig_path)
"""
from __future__ import annotations

from greta.reports import fmt, md
from greta.reports.sweep_section import Section, memory_label

COLUMNS = ["Point", "Context", "KV", "Peak memory (MiB)", "Max |Δlogit|", "Bit-exact", "Verdict"]


def table_md(rows: list[dict]) -> str:
    out = []
    for r in rows:
        verdict = (r.get("verdict") or "not run") + ("" if r.get("complete", True) else " (record incomplete)")
        out.append([r["name"], r.get("ctx", "—"), r.get("kv_aligned", "—"), fmt.num(r.get("peak_vram_mb"), "{:.0f}"), fmt.num(r.get("max_abs_diff"), "{:.3g}"),
                    r.get("bit_exact"), verdict])
    return md.table(COLUMNS, out)


def sweep_sections(rows: list[dict], fig_path) -> list[Section]:
    """Its part of the sweep report (no figure: each point's record holds its own degree x position heat map)."""
    return [Section("Results", "One row per point, each comparing the degrees 1, 2, .. tp of the base params: the largest |Δlogit| of any degree against tp=1 (every prefill, "
                    "decode and reference position) or of decode against its prefill within a degree; kv_aligned=1 "
                    f"must be 0 (bit-exact). Peak memory: {memory_label(rows)}, in MiB (2^20 bytes); rank 0 holds "
                    "every degree's shard.", table_md(rows))]
