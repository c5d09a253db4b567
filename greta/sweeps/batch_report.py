"""A batch-probe sweep's own figures (matrix batch x ctx x kv_aligned, params/batch_*.yaml): decode throughput
against B with the roofline floor, and the worst request's |Δlogit| against B. Data preparation (tested) and
drawing, called by notebooks/sweep_report.ipynb next to greta.sweeps.report's tables and plots.

    series = throughput_series(rows); plot_throughput_vs_batch(rows, path); plot_diff_vs_batch(rows, path)
"""
from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from greta.reports import fmt, md
from greta.reports.plot_style import FAIL_COLOR, VERDICT_COLORS, log_floor, save as _save
from greta.sweeps.report import DPI, KV_COLORS

PLOTS = ("sweep_batch_throughput.png", "sweep_batch_diff.png")
ZERO_COLOR = VERDICT_COLORS["PASS_EQUIV"]
COLUMNS = ["Point", "B", "Decode tok/s", "Floor tok/s", "% of floor", "ms/step", "Prefill tok/s", "Worst |Δ|",
           "Verdict"]


def has_batch(rows: list[dict]) -> bool:
    return any(r.get("probe") == "batch" for r in rows)


def _full(r) -> dict:
    return (r.get("batch_throughput") or {}).get("full_batch") or {}


def throughput_series(rows: list[dict]) -> list[dict]:
    """Per (ctx, kv_aligned): the points' B, decode tokens/s and floor tokens/s (whole batch live), sorted by B;
    a point without figures (failed, not run) is left out of its series."""
    groups: dict = {}
    for r in rows:
        f = _full(r)
        if r.get("probe") == "batch" and f.get("tokens_per_s") is not None:
            groups.setdefault((r["ctx"], int(r["kv_aligned"])), []).append(
                (r["batch"], f["tokens_per_s"], f.get("floor_tokens_per_s")))
    return [{"ctx": c, "kv_aligned": kv, "batch": [p[0] for p in pts], "tokens_per_s": [p[1] for p in pts],
             "floor_tokens_per_s": [p[2] for p in pts]}
            for (c, kv), pts in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][1])) for pts in [sorted(pts)]]


def diff_series(rows: list[dict]) -> list[dict]:
    """Per (ctx, kv_aligned): the worst request's max |Δlogit| per B (None where the point has no metrics)."""
    groups: dict = {}
    for r in rows:
        if r.get("probe") == "batch":
            groups.setdefault((r["ctx"], int(r["kv_aligned"])), []).append((r["batch"], r.get("max_abs_diff")))
    return [{"ctx": c, "kv_aligned": kv, "batch": [p[0] for p in pts], "max_abs_diff": [p[1] for p in pts]}
            for (c, kv), pts in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][1])) for pts in [sorted(pts)]]


def table_md(rows: list[dict]) -> str:
    out = []
    for r in (r for r in rows if r.get("probe") == "batch"):
        f = _full(r)
        pct = f["ratio_of_floor"] * 100 if f.get("ratio_of_floor") is not None else None
        out.append([r["name"], r["batch"], fmt.num(f.get("tokens_per_s"), "{:.1f}"),
                    fmt.num(f.get("floor_tokens_per_s"), "{:.1f}"), fmt.num(pct, "{:.0f}%"),
                    fmt.num(f.get("ms_per_step_median"), "{:.3f}"),
                    fmt.num((r.get("batch_throughput") or {}).get("prefill_tokens_per_s"), "{:.1f}"),
                    fmt.num(r.get("max_abs_diff"), "{:.3g}"), r.get("verdict") or "not run"])
    return md.table(COLUMNS, out)


def _style(s, i):
    return {"color": KV_COLORS.get(s["kv_aligned"], "#555"), "marker": "os^Dv"[i % 5],
            "label": f"ctx {s['ctx']:,} kv_aligned={s['kv_aligned']}"}


def _batch_axis(ax, rows):
    bs = sorted({r["batch"] for r in rows if r.get("probe") == "batch" and r.get("batch")})
    ax.set_xscale("log", base=2)
    if bs:
        ax.set_xticks(bs)
        ax.set_xticklabels([str(b) for b in bs])
        ax.set_xlim(bs[0] / 1.3, bs[-1] * 1.3)
    ax.set_xlabel("requests decoded together, B (log₂ axis)")
    ax.grid(True, alpha=0.3)


def plot_throughput_vs_batch(rows: list[dict], path=None) -> Figure:
    """Decode tokens/s with the whole batch live vs B, per (ctx, kv_aligned); dotted: the roofline floor's
    tokens/s (weights once + each sequence's KV per step, over the measured copy bandwidth)."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for i, s in enumerate(throughput_series(rows)):
        st = _style(s, i)
        ax.plot(s["batch"], s["tokens_per_s"], color=st["color"], marker=st["marker"], label=f"{st['label']} measured")
        fl = [(b, f) for b, f in zip(s["batch"], s["floor_tokens_per_s"]) if f is not None]
        if fl:
            ax.plot(*zip(*fl), color=st["color"], ls=":", lw=2, alpha=0.8, label=f"{st['label']} floor")
    _batch_axis(ax, rows)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s, whole batch live (log)")
    ax.set_title("Decode throughput vs batch size against the roofline floor")
    ax.legend(fontsize=8, loc="best")
    _save(fig, path, dpi=DPI)
    return fig


def plot_diff_vs_batch(rows: list[dict], path=None) -> Figure:
    """The worst request's max |Δlogit| (alone vs batch vs reference) vs B; bit-exact points sit on the 0 line;
    points without metrics (faults) are red crosses on the axis."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    series = diff_series(rows)
    zero = log_floor([v for s in series for v in s["max_abs_diff"] if v is not None], [])
    for i, s in enumerate(series):
        st = _style(s, i)
        pts = [(b, v if v > 0 else zero) for b, v in zip(s["batch"], s["max_abs_diff"]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), color=st["color"], marker=st["marker"], label=st["label"])
        for b in (b for b, v in zip(s["batch"], s["max_abs_diff"]) if v is None):
            ax.plot([b], [0.03], "x", color=FAIL_COLOR, ms=12, mew=2.5, transform=ax.get_xaxis_transform())
    ax.axhline(zero, color=ZERO_COLOR, ls=":", lw=1.2)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color=ZERO_COLOR, ls=":", label="0 — every request bit-exact (drawn on the log axis)"),
                Line2D([], [], color=FAIL_COLOR, marker="x", ls="", label="no metrics (fault)")]
    _batch_axis(ax, rows)
    ax.set_yscale("log")
    ax.set_ylim(zero / 3, max([zero * 10] + [v for s in series for v in s["max_abs_diff"] if v]) * 5)
    ax.set_ylabel("worst request's max |Δlogit| (log)")
    ax.set_title("Alone vs in batch vs prefill reference: the worst request per point")
    ax.legend(handles=handles, fontsize=8, loc="best")
    _save(fig, path, dpi=DPI)
    return fig
