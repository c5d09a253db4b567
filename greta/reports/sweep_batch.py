"""The batch probe's sweep-report section (greta.probe.kinds: its sweep_sections; matrix batch x ctx x
kv_aligned, params/batch_*.yaml): the points with their B, decode throughput against B with the roofline
floor, peak memory against B with the weights + KV floor, the worst request's |Δlogit| against B, and the
price of exactness per (ctx, B). Data preparation (tested) and drawing; the rows are
greta.sweeps.report.collect's, each with "ok".

    sections = sweep_sections(rows, fig_path)   # fig_path(name) -> where the figure goes
"""
from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from greta.reports import fmt, md
from greta.reports.plot_style import FAIL_COLOR, VERDICT_COLORS, log_floor, mb_formatter, save as _save
from greta.reports.sweep_b3_77 import DPI, KV_COLORS
from greta.reports.sweep_section import Section, memory_label

PLOTS = ("sweep_batch_throughput.png", "sweep_batch_memory.png", "sweep_batch_diff.png")
ZERO_COLOR = VERDICT_COLORS["PASS_EQUIV"]
COLUMNS = ["Point", "B", "Context", "KV", "Decode tok/s", "Floor tok/s", "% of floor", "ms/step", "Prefill tok/s",
           "Peak memory (MiB)", "Worst |Δlogit|", "Verdict"]
PRICE_COLUMNS = ["Context", "B", "kv1 tok/s", "kv0 tok/s", "kv0/kv1 tok/s", "kv1 ms/step", "kv0 ms/step"]


def _full(r) -> dict:
    return (r.get("batch_throughput") or {}).get("full_batch") or {}


def _by_series(rows, value) -> list[dict]:
    """Per (ctx, kv_aligned), sorted by B: [(B, value(row))], kv1 first."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["ctx"], int(r["kv_aligned"])), []).append((r["batch"], value(r)))
    return [{"ctx": c, "kv_aligned": kv, "points": sorted(pts, key=lambda p: p[0])}
            for (c, kv), pts in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][1]))]


def throughput_series(rows: list[dict]) -> list[dict]:
    """Per (ctx, kv_aligned): the points' B, decode tokens/s and floor tokens/s (whole batch live), sorted by B;
    a point without figures (failed, not run) is left out of its series."""
    out = []
    for s in _by_series([r for r in rows if _full(r).get("tokens_per_s") is not None], _full):
        out.append({"ctx": s["ctx"], "kv_aligned": s["kv_aligned"], "batch": [b for b, _ in s["points"]],
                    "tokens_per_s": [f["tokens_per_s"] for _, f in s["points"]],
                    "floor_tokens_per_s": [f.get("floor_tokens_per_s") for _, f in s["points"]]})
    return out


def diff_series(rows: list[dict]) -> list[dict]:
    """Per (ctx, kv_aligned): the worst request's max |Δlogit| per B (None where the point has no metrics)."""
    return [{"ctx": s["ctx"], "kv_aligned": s["kv_aligned"], "batch": [b for b, _ in s["points"]],
             "max_abs_diff": [v for _, v in s["points"]]} for s in _by_series(rows, lambda r: r.get("max_abs_diff"))]


def memory_series(rows: list[dict]) -> list[dict]:
    """Per (ctx, kv_aligned): peak sampled memory and the record's weights + KV floor (MiB) per B."""
    return [{"ctx": s["ctx"], "kv_aligned": s["kv_aligned"], "batch": [b for b, _ in s["points"]],
             "peak_mib": [v[0] for _, v in s["points"]], "floor_mib": [v[1] for _, v in s["points"]]}
            for s in _by_series(rows, lambda r: (r.get("peak_vram_mb"), r.get("floor_mb")))]


def price_of_exactness(rows: list[dict]) -> list[dict]:
    """Per (ctx, B) with both a kv_aligned=1 and a kv_aligned=0 point: decode tokens/s and ms per step of each
    (whole batch live), and kv0 / kv1 tokens/s (above 1: exactness costs that factor at this B)."""
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r["ctx"], r["batch"]), {})[int(r["kv_aligned"])] = _full(r)
    out = []
    for (ctx, b), kv in sorted(pairs.items()):
        if 0 in kv and 1 in kv:
            t1, t0 = kv[1].get("tokens_per_s"), kv[0].get("tokens_per_s")
            out.append({"ctx": ctx, "batch": b, "kv1_tokens_per_s": t1, "kv0_tokens_per_s": t0,
                        "ratio": t0 / t1 if t0 is not None and t1 else None,
                        "kv1_ms_per_step": kv[1].get("ms_per_step_median"),
                        "kv0_ms_per_step": kv[0].get("ms_per_step_median")})
    return out


def table_md(rows: list[dict]) -> str:
    out = []
    for r in rows:
        f = _full(r)
        pct = f["ratio_of_floor"] * 100 if f.get("ratio_of_floor") is not None else None
        verdict = (r.get("verdict") or "not run") + ("" if r.get("complete", True) else " (record incomplete)")
        out.append([r["name"], r["batch"], r["ctx"], r["kv_aligned"], fmt.num(f.get("tokens_per_s"), "{:.1f}"),
                    fmt.num(f.get("floor_tokens_per_s"), "{:.1f}"), fmt.num(pct, "{:.0f}%"),
                    fmt.num(f.get("ms_per_step_median"), "{:.3f}"),
                    fmt.num((r.get("batch_throughput") or {}).get("prefill_tokens_per_s"), "{:.1f}"),
                    fmt.num(r.get("peak_vram_mb"), "{:.0f}"), fmt.num(r.get("max_abs_diff"), "{:.3g}"), verdict])
    return md.table(COLUMNS, out)


def price_md(rows: list[dict]) -> str:
    price = price_of_exactness(rows)
    if not price:
        return md.text("No (ctx, B) ran in both kv_aligned modes: no price of exactness to show.")
    return md.table(PRICE_COLUMNS, [[p["ctx"], p["batch"], fmt.num(p["kv1_tokens_per_s"], "{:.1f}"),
                                     fmt.num(p["kv0_tokens_per_s"], "{:.1f}"), fmt.num(p["ratio"], "{:.2f}"),
                                     fmt.num(p["kv1_ms_per_step"], "{:.3f}"), fmt.num(p["kv0_ms_per_step"], "{:.3f}")]
                                    for p in price])


def _style(s, i):
    return {"color": KV_COLORS.get(s["kv_aligned"], "#555"), "marker": "os^Dv"[i % 5],
            "label": f"ctx {s['ctx']:,} kv_aligned={s['kv_aligned']}"}


def _batch_axis(ax, rows):
    bs = sorted({r["batch"] for r in rows if r.get("batch")})
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
    ax.set_ylabel("decode throughput (tokens/s, whole batch live, log)")
    ax.set_title("Decode throughput vs batch size against the roofline floor")
    ax.legend(fontsize=8, loc="best")
    _save(fig, path, dpi=DPI)
    return fig


def plot_memory_vs_batch(rows: list[dict], path=None) -> Figure:
    """Peak sampled memory vs B per (ctx, kv_aligned), with each point's weights + KV floor (dashed): every
    peak must sit on or above its floor."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for i, s in enumerate(memory_series(rows)):
        st = _style(s, i)
        pk = [(b, v) for b, v in zip(s["batch"], s["peak_mib"]) if v is not None]
        fl = [(b, v) for b, v in zip(s["batch"], s["floor_mib"]) if v is not None]
        if pk:
            ax.plot(*zip(*pk), color=st["color"], marker=st["marker"], label=f"{st['label']} peak")
        if fl:
            ax.plot(*zip(*fl), color=st["color"], ls="--", lw=1.5, alpha=0.8, label=f"{st['label']} floor: weights + KV")
    _batch_axis(ax, rows)
    ax.set_ylabel(f"peak memory (MiB) — {memory_label(rows)}")
    ax.yaxis.set_major_formatter(mb_formatter)
    ax.set_ylim(bottom=0)
    ax.set_title("Peak memory vs batch size: every peak must sit on or above its floor")
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
    ax.set_ylabel("worst request's max |Δlogit| (logit units, log)")
    ax.set_title("Drift vs batch size: alone vs in the batch vs the prefill reference, the worst request")
    ax.legend(handles=handles, fontsize=8, loc="best")
    _save(fig, path, dpi=DPI)
    return fig


def sweep_sections(rows: list[dict], fig_path) -> list[Section]:
    """The batch probe's part of its sweep report, figures drawn to fig_path(name)."""
    png = {name: fig_path(name) for name in PLOTS}
    plot_throughput_vs_batch(rows, png[PLOTS[0]])
    plot_memory_vs_batch(rows, png[PLOTS[1]])
    plot_diff_vs_batch(rows, png[PLOTS[2]])
    return [
        Section("Results", "One row per point with its batch size B. Decode figures are with the whole batch live; "
                "the floor per step reads every weight once plus each live request's KV, over the copy bandwidth "
                "measured in that run; peak memory is the sampled peak in MiB (2^20 bytes).", table_md(rows)),
        Section("Throughput vs B", "Decode tokens/s against the number of requests decoded together; dotted: "
                "the roofline floor.", figures=(png[PLOTS[0]],)),
        Section("Memory vs B", "Peak memory per point against its weights + KV floor (a KV slab per request).",
                figures=(png[PLOTS[1]],)),
        Section("Drift vs B", "For each point the worst request's largest |Δlogit| between its logits decoded "
                "alone, in the batch and from its prefill reference. kv_aligned=1 must be 0 (bit-exact) at every B.",
                figures=(png[PLOTS[2]],)),
        Section("Price of exactness per B", "Where a (ctx, B) ran in both kv_aligned modes: decode tokens/s of "
                "each and kv0 / kv1 (above 1, exactness costs that factor at that B).", price_md(rows)),
    ]
