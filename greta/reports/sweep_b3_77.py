"""B3.77's sweep-report section (greta.probe.kinds: its sweep_sections): the results and timing tables, the
price of exactness per ctx, and the figures against ctx (peak memory with the analytic floor, time against
the roofline, max |Δlogit|, drift over the span). Data preparation (tested) and drawing; the rows are
greta.sweeps.report.collect's, each with "ok": held or measured as its kind expects.

    sections = sweep_sections(rows, fig_path)   # fig_path(name) -> where the figure goes
"""
from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from greta.record.params import DEFAULTS
from greta.reports import fmt, md
from greta.reports.plot_style import FAIL_COLOR, VERDICT_COLORS, log_floor, on_log_axis, save as _save
from greta.reports.sweep_section import Section, memory_label

THRESHOLD = DEFAULTS["thresholds"]["max_abs_diff"]  # the default max |Δlogit| guardrail (5e-3)
ZERO_COLOR = VERDICT_COLORS["PASS_EQUIV"]  # the bit-exact line
DPI = 110
KV_COLORS = {1: "#1f77b4", 0: "#ff7f0e"}
PEER_COLORS = ("#9467bd", "#8c564b", "#e377c2")  # peer engines under audit (an engine axis)
PLOTS = ("sweep_vram.png", "sweep_time.png", "sweep_diff.png", "sweep_drift.png")


# ----------------------------------------------------------------------------- tables
RESULTS_COLUMNS = ["Context", "KV", "Peak memory (MiB)", "Max Logits Diff", "Top-1 Agreement", "Verdict", "Seed", "Dtype"]
TIMING_COLUMNS = ["Point", "Prefill (s)", "Prefill floor (s)", "Decode (ms/token)", "Decode floor (ms/token)",
                  "Memory floor (MiB)", "bit_exact", "Record"]


def _verdict_cell(r: dict) -> str:
    if not r["exists"]:
        return "not run"
    return (r["verdict"] or fmt.NONE) + (" (record incomplete)" if not r["complete"] else "")


def results_table_md(rows: list[dict]) -> str:
    """The seed report's table, one row per point, plus seed and dtype columns (KV names the engine where peer
    engines ran too)."""
    peers = has_peers(rows)
    return md.table(RESULTS_COLUMNS, [[r["ctx"], engine_label(r) if peers else r["kv_aligned"], fmt.num(r["peak_vram_mb"], "{:.0f}"),
                                       fmt.num(r["max_abs_diff"], "{:.6f}"), fmt.num(r["top1_agreement"], "{:.4f}"),
                                       _verdict_cell(r), r["seed"], r["dtype"]] for r in rows])


def timing_table_md(rows: list[dict]) -> str:
    return md.table(TIMING_COLUMNS, [
        [r["name"], fmt.num(r["prefill_s"], "{:.3g}"), fmt.num(r["prefill_floor_s"], "{:.3g}"),
         fmt.num(r["decode_ms_per_token"], "{:.3g}"), fmt.num(r["decode_floor_ms"], "{:.3g}"),
         fmt.num(r["floor_mb"], "{:.0f}"), fmt.num(r["bit_exact"], "{}"),
         md.text("verifies" if r["complete"] else ("; ".join(r["reasons"][:2]) or "incomplete"), limit=200)]
        for r in rows])


def price_of_exactness(rows: list[dict]) -> list[dict]:
    """Where a (ctx, seed, dtype) has both a kv_aligned=1 and a kv_aligned=0 point of Greta's: their prefill and
    decode times and kv1 / kv0 per phase (None where a time is missing), ordered by ctx."""
    pairs: dict = {}
    for r in (r for r in rows if _engine(r) == "greta"):
        pairs.setdefault((r["ctx"], r["seed"], r["dtype"]), {})[int(r["kv_aligned"])] = r
    out = []
    for (ctx, seed, dtype), kv in sorted(pairs.items(), key=lambda x: (x[0][0], str(x[0][1]), str(x[0][2]))):
        if 0 not in kv or 1 not in kv:
            continue
        row = {"ctx": ctx, "seed": seed, "dtype": dtype}
        for key in ("prefill_s", "decode_ms_per_token"):
            a, b = kv[1].get(key), kv[0].get(key)
            row[f"kv1_{key}"], row[f"kv0_{key}"] = a, b
            row[f"{key}_ratio"] = a / b if a is not None and b else None
        out.append(row)
    return out


def price_of_exactness_md(rows: list[dict]) -> str:
    """The price of exactness as a table: kv1 / kv0 time per phase and ctx (above 1: exactness costs)."""
    price = price_of_exactness(rows)
    if not price:
        return md.text("No (ctx, seed, dtype) has both kv_aligned modes: no price of exactness to show.")
    many = len({(p["seed"], p["dtype"]) for p in price}) > 1
    cols = ["Context"] + (["Seed", "Dtype"] if many else []) + [
        "kv1 prefill (s)", "kv0 prefill (s)", "prefill kv1/kv0", "kv1 decode (ms/token)", "kv0 decode (ms/token)",
        "decode kv1/kv0"]
    return md.table(cols, [[p["ctx"]] + ([p["seed"], p["dtype"]] if many else []) + [
        fmt.num(p["kv1_prefill_s"], "{:.3g}"), fmt.num(p["kv0_prefill_s"], "{:.3g}"), fmt.num(p["prefill_s_ratio"], "{:.2f}"),
        fmt.num(p["kv1_decode_ms_per_token"], "{:.3g}"), fmt.num(p["kv0_decode_ms_per_token"], "{:.3g}"),
        fmt.num(p["decode_ms_per_token_ratio"], "{:.2f}")] for p in price])


def threshold(rows: list[dict], default: float = THRESHOLD) -> float:
    """The max |Δlogit| threshold the points were judged with (params.json), else the seed's 5e-3."""
    return next((r["threshold"] for r in rows if r.get("threshold") is not None), default)


def _engine(r: dict) -> str:
    return r.get("engine") or "greta"


def engine_label(r: dict) -> str:
    """greta/kv1, greta/kv0, or a peer engine's name (it runs its own paths: no kv_aligned of its own)."""
    return f"greta/kv{r['kv_aligned']}" if _engine(r) == "greta" else _engine(r)


ENGINE_COLUMNS = ["Engine", "Context", "bit_exact", "Max |Δlogit|", "p99 |Δlogit|", "Top-1", "First differing",
                  "Prefill (tokens/s)", "Decode (ms/token)", "Decode (tokens/s)", "Verdict"]


def engines_table_md(rows: list[dict]) -> str:
    """The engines side by side: each point's decode against its own prefill, and its speed."""
    def first(r):
        if r["first_diff_step"] is None:
            return "none" if r["bit_exact"] else fmt.NONE
        return f"step {r['first_diff_step']} (position {r['first_diff_position']})"

    def per_s(ms):
        return 1e3 / ms if ms else None
    return md.table(ENGINE_COLUMNS, [
        [md.line(engine_label(r), *([f"({r['engine_version']})"] if r.get("engine_version") else [])), r["ctx"],
         fmt.num(r["bit_exact"], "{}"), fmt.num(r["max_abs_diff"], "{:.3g}"), fmt.num(r["p99_abs_diff"], "{:.3g}"),
         fmt.num(r["top1_agreement"], "{:.4f}"), first(r), fmt.num(r.get("prefill_tokens_per_s"), "{:.1f}"),
         fmt.num(r["decode_ms_per_token"], "{:.1f}"), fmt.num(per_s(r["decode_ms_per_token"]), "{:.1f}"),
         _verdict_cell(r)] for r in rows])


def has_peers(rows: list[dict]) -> bool:
    """The sweep ran some point through a peer engine (an engine axis): the report compares the engines."""
    return any(_engine(r) != "greta" for r in rows)


# ------------------------------------------------------------------------------ plots
def _series(rows):
    """Rows grouped by (engine, kv_aligned, dtype, seed), each sorted by ctx; labels only name what varies."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kv_aligned"], r["dtype"], r["seed"], _engine(r)), []).append(r)
    many_dtype = len({k[1] for k in groups}) > 1
    many_seed = len({k[2] for k in groups}) > 1
    out = []
    for i, (k, rs) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][3] != "greta", -int(kv[0][0]), kv[0][1:]))):
        label = (f"kv_aligned={k[0]}" if k[3] == "greta" else f"engine={k[3]}") + (f" {k[1]}" if many_dtype else "") \
            + (f" seed {k[2]}" if many_seed else "")
        color = KV_COLORS.get(int(k[0]), "#555") if k[3] == "greta" else PEER_COLORS[i % len(PEER_COLORS)]
        style = {"color": color, "marker": "os^Dv"[(k[2] if isinstance(k[2], int) else i) % 5],
                 "linestyle": "-" if not many_dtype or k[1] == "bfloat16" else "-."}
        out.append((label, sorted(rs, key=lambda r: r["ctx"]), style))
    return out


def _ctx_axis(ax, rows):
    ctxs = sorted({r["ctx"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ctxs)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v):,}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(ctxs) == 1:
        ax.set_xlim(ctxs[0] / 1.5, ctxs[0] * 1.5)
    else:
        ax.set_xlim(ctxs[0] / 1.25, ctxs[-1] * 1.25)
    ax.set_xlabel("context length (tokens, log₂ axis)")
    ax.grid(True, which="major", alpha=0.3)


def _failed(r) -> bool:
    return r["exists"] and r["verdict"] is not None and not r.get("ok")


def _mark_failures(ax, rows, value_key):
    """A red cross per failed or missing point: at its value if it has one, else on the x axis; labels of
    several failures at one ctx are stacked, not overprinted."""
    stacked: dict = {}
    for r in rows:
        if r.get("ok") and r["complete"]:
            continue
        label = f"{r['verdict'] or 'not run'} (kv={r['kv_aligned']})"
        y = r.get(value_key)
        k = stacked.get((r["ctx"], y is None), 0)
        stacked[(r["ctx"], y is None)] = k + 1
        if y is not None:
            ax.plot([r["ctx"]], [y], "x", color=FAIL_COLOR, ms=12, mew=2.5, zorder=5)
            ax.annotate(label, (r["ctx"], y), textcoords="offset points", xytext=(8, -14 - 12 * k),
                        color=FAIL_COLOR, fontsize=8)
        else:
            ax.plot([r["ctx"]], [0.03], "x", color=FAIL_COLOR, ms=12, mew=2.5, zorder=5,
                    transform=ax.get_xaxis_transform(), clip_on=False)
            ax.annotate(label, (r["ctx"], 0.03), xycoords=ax.get_xaxis_transform(),
                        textcoords="offset points", xytext=(8, 4 + 12 * k), color=FAIL_COLOR, fontsize=8)


def _fail_legend(handles):
    return handles + [Line2D([], [], color=FAIL_COLOR, marker="x", ls="", ms=10, mew=2.5, label="failed / not run")]


def _analytic_floor(rows, ctxs):
    """(dtype, [ctx], [floor MiB]) per dtype, from the model config: weights + KV for ctx + gen tokens."""
    from greta.engine.source import load_config
    from greta.record.params import dtype_bytes
    from greta.record.samples import floor_mb

    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        rs = [r for r in rows if r["dtype"] == dtype]
        model = next((r["model"] for r in rs if r.get("model")), None)
        gen = next((r["gen"] for r in rs if r.get("gen")), 0)
        try:
            cfg = load_config(model) if model else None
        except Exception:  # noqa: BLE001 - an unreadable checkpoint config: fall back to the records' floors
            cfg = None
        if cfg is not None:
            xs = sorted(set(ctxs) | {2 ** k for k in range(int(math.log2(min(ctxs))), int(math.log2(max(ctxs))) + 1)})
            out.append((dtype, xs, [floor_mb(cfg, dtype_bytes(dtype), c + gen)["total_mb"] for c in xs]))
        else:
            pts = sorted({(r["ctx"], r["floor_mb"]) for r in rs if r["floor_mb"] is not None})
            if pts:
                out.append((dtype, [p[0] for p in pts], [p[1] for p in pts]))
    return out


def plot_vram_vs_ctx(rows: list[dict], path=None) -> Figure:
    """Peak sampled memory per point vs ctx, with the analytic weights + KV floor as a line."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    handles = []
    for label, rs, st in _series(rows):
        pts = [(r["ctx"], r["peak_vram_mb"]) for r in rs if r["peak_vram_mb"] is not None and not _failed(r)]
        if pts:
            (h,) = ax.plot(*zip(*pts), label=label, color=st["color"], marker=st["marker"], ls=st["linestyle"], ms=7)
            handles.append(h)
    ctxs = sorted({r["ctx"] for r in rows})
    for dtype, xs, ys in _analytic_floor(rows, ctxs):
        (h,) = ax.plot(xs, ys, color="#333", ls="--", lw=1.5, label=f"analytic floor: weights + KV ({dtype})")
        handles.append(h)
    _mark_failures(ax, rows, "peak_vram_mb")
    _ctx_axis(ax, rows)
    ax.set_ylabel(f"peak memory (MiB) — {memory_label(rows)}")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_ylim(bottom=0)
    ax.set_title("Peak memory vs context: every measured peak must sit on or above the floor")
    ax.legend(handles=_fail_legend(handles), loc="best", fontsize=9)
    _save(fig, path, dpi=DPI)
    return fig


def plot_time_vs_ctx(rows: list[dict], path=None) -> Figure:
    """Prefill wall time and decode ms/token vs ctx, each with its roofline floor (dashed) from the
    ceilings measured in the same run."""
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, floor_key, ylabel, title in (
            (axes[0], "prefill_s", "prefill_floor_s", "prefill wall time (s, log)", "Prefill time vs context"),
            (axes[1], "decode_ms_per_token", "decode_floor_ms", "decode (ms per token, log)", "Decode time per token vs context")):
        handles = []
        for label, rs, st in _series(rows):
            pts = [(r["ctx"], r[key]) for r in rs if r[key] is not None]
            fl = [(r["ctx"], r[floor_key]) for r in rs if r[floor_key] is not None]
            if pts:
                (h,) = ax.plot(*zip(*pts), label=f"{label} measured", color=st["color"], marker=st["marker"], ls=st["linestyle"], ms=7)
                handles.append(h)
            if fl:
                (h,) = ax.plot(*zip(*fl), label=f"{label} roofline floor", color=st["color"], ls=":", lw=2, alpha=0.8)
                handles.append(h)
        _mark_failures(ax, [r for r in rows if r[key] is None], key)
        _ctx_axis(ax, rows)
        if any(r[key] or r[floor_key] for r in rows):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(handles=_fail_legend(handles), fontsize=8, loc="best")
    fig.suptitle("Timing against the roofline (floor = FLOPs / measured matmul rate; bytes / measured copy bandwidth)",
                 fontsize=10)
    _save(fig, path, dpi=DPI)
    return fig


def plot_diff_vs_ctx(rows: list[dict], path=None, threshold: float = THRESHOLD) -> Figure:
    """Max |Δlogit| (decode vs prefill reference) vs ctx, one series per kv_aligned value; a bit-exact
    point (0) sits on a marked line below every positive value; the guardrail threshold is drawn."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    zero = log_floor([r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None], [threshold])
    handles = []
    for label, rs, st in _series(rows):
        pts = [(r["ctx"], r["max_abs_diff"] if r["max_abs_diff"] > 0 else zero) for r in rs if r["max_abs_diff"] is not None]
        if pts:
            (h,) = ax.plot(*zip(*pts), label=label, color=st["color"], marker=st["marker"], ls=st["linestyle"], ms=8)
            handles.append(h)
    ax.axhline(on_log_axis(threshold, zero), color=FAIL_COLOR, ls="--", lw=1.2)
    handles.append(Line2D([], [], color=FAIL_COLOR, ls="--",
                          label=f"guardrail max |Δ| ≤ {fmt.threshold(threshold)} (kv_aligned=1)"))
    ax.axhline(zero, color=ZERO_COLOR, ls=":", lw=1.2)
    handles.append(Line2D([], [], color=ZERO_COLOR, ls=":", label="0 — bit-exact (drawn here on the log axis)"))
    _mark_failures(ax, [r for r in rows if r["max_abs_diff"] is None], "max_abs_diff")
    _ctx_axis(ax, rows)
    ax.set_yscale("log")
    ax.set_ylim(zero / 3, max([zero * 10, threshold] + [r["max_abs_diff"] or 0 for r in rows]) * 5)
    ax.set_ylabel("max |Δlogit| over the span (logit units, log)")
    ax.set_title("Decode vs prefill: largest logit difference per point")
    ax.legend(handles=_fail_legend(handles), fontsize=9, loc="best")
    _save(fig, path, dpi=DPI)
    return fig


def plot_drift(rows: list[dict], path=None, threshold: float = THRESHOLD) -> Figure:
    """Per-step max |Δlogit| over the compared span, one panel per kv_aligned value, one line per point."""
    kvs = sorted({int(r["kv_aligned"]) for r in rows}, reverse=True) or [1]
    fig = Figure(figsize=(6.5 * len(kvs), 5), layout="constrained")
    axes = fig.subplots(1, len(kvs), squeeze=False)[0]
    allv = [v for r in rows for v in r["per_position_max_abs_diff"] if v is not None]
    zero = log_floor(allv, [threshold])
    ctxs = sorted({r["ctx"] for r in rows})
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for ax, kv in zip(axes, kvs):
        drawn = 0
        for r in sorted((r for r in rows if int(r["kv_aligned"]) == kv), key=lambda r: (r["ctx"], r["seed"], r["dtype"])):
            ys = r["per_position_max_abs_diff"]
            if not ys:
                continue
            c = cmap(ctxs.index(r["ctx"]) / max(1, len(ctxs) - 1) * 0.85)
            ax.plot(range(len(ys)), [zero if (v is not None and v <= 0) else v for v in ys], color=c, marker=".",
                    label=(f"{engine_label(r)} " if has_peers(rows) else "") + f"ctx {r['ctx']:,}" + (f" seed {r['seed']}" if len({x['seed'] for x in rows}) > 1 else "")
                    + (f" {r['dtype']}" if len({x['dtype'] for x in rows}) > 1 else ""))
            drawn += 1
        ax.axhline(zero, color=ZERO_COLOR, ls=":", lw=1.2, label="0 — bit-exact")
        if kv == 1:
            ax.axhline(on_log_axis(threshold, zero), color=FAIL_COLOR, ls="--", lw=1.2,
                       label=f"guardrail {fmt.threshold(threshold)}")
        ax.set_yscale("log")
        ax.set_ylim(zero / 3, max([zero * 10, threshold] + allv) * 5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step over the span (0 = last prompt position, from prefill; 1.. = decode steps)")
        ax.set_ylabel("max |Δlogit| at the step (logit units, log)")
        ax.set_title(f"kv_aligned={kv}: drift over the span" + ("" if drawn else " — no logits (every point failed)"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    _save(fig, path, dpi=DPI)
    return fig


ENGINES_INTRO = (
    "One row per point: Greta at kv_aligned=1 and 0, and each peer engine under audit (its own prefill, decode from "
    "its own KV cache, and reference; docs/ENGINES.md) on the same prompt ids. Each compares its decode path with its "
    "own prefill path over the span: bit_exact, max and p99 |Δlogit|, top-1 agreement, and the first span step "
    "whose logits are not bit-identical (step 0 is the prefill's last position). A peer engine is held to what "
    "Greta's kv_aligned=1 gives, bit-exactness: PASS_EQUIV, else ENGINE_DRIFT (measured, not a failure of "
    "Greta's). Speed: prefill tokens per second of wall time over the prompt, decode ms and tokens per second.")


def sweep_sections(rows: list[dict], fig_path) -> list[Section]:
    """B3.77's part of its sweep report, figures drawn to fig_path(name); with peer engines, their comparison
    first."""
    png = {name: fig_path(name) for name in PLOTS}
    thr = threshold(rows)
    plot_vram_vs_ctx(rows, png["sweep_vram.png"])
    plot_time_vs_ctx(rows, png["sweep_time.png"])
    plot_diff_vs_ctx(rows, png["sweep_diff.png"], threshold=thr)
    plot_drift(rows, png["sweep_drift.png"], threshold=thr)
    engines = [Section("Engines side by side", ENGINES_INTRO, engines_table_md(rows))] if has_peers(rows) else []
    return engines + [
        Section("Results", "One row per point, as in the seed report, plus seed and dtype. Peak memory is the sampled "
                "peak in MiB (2^20 bytes): device memory, process RSS on the CPU; max logits diff and top-1 "
                "agreement compare the decode path with the prefill path over the span.", results_table_md(rows)),
        Section("Memory", "Every peak must be on or above the analytic floor (weights + KV cache for ctx + gen "
                "tokens); failed points are red crosses.", figures=(png["sweep_vram.png"],)),
        Section("Time against the roofline", "Measured prefill time and decode time per token; dotted: the floor "
                "from the ceilings (matmul rate, copy bandwidth) measured in the same run.",
                figures=(png["sweep_time.png"],), after=timing_table_md(rows)),
        Section("Price of exactness", "Where a context ran in both kv_aligned modes: the exact path's time over "
                "the fast path's, per phase (kv1 / kv0; above 1, exactness costs that factor).",
                price_of_exactness_md(rows)),
        Section("Equivalence", "Largest |Δlogit| per point, for each kv_aligned value, and how it evolves over the "
                "span.", figures=(png["sweep_diff.png"], png["sweep_drift.png"])),
    ]
