"""Plots and small tables for a B3.77 run directory (layout: docs/RECORD.md).

Everything here reads only the files of one run directory and never raises for
a run that failed part-way (a FAIL_OOM run has no per-position metrics, a CPU run
has no allocator columns): a missing figure is drawn as a note, not an exception.
The one exception is a missing ``vram.json`` / ``vram_samples.csv`` for
:func:`plot_vram`, which means the record itself is broken.

Figures are built with :class:`matplotlib.figure.Figure` directly, not pyplot: no
GUI backend is touched, nothing accumulates in pyplot's figure registry, and it
works the same under Agg, in a Jupyter kernel and in a headless test.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, ScalarFormatter

__all__ = [
    "plot_vram",
    "plot_equivalence",
    "top1_table",
    "results_table_md",
    "table_md",
    "verdict_md",
    "metrics_summary_md",
    "vram_summary_md",
    "read_vram_samples",
    "DEFAULT_THRESHOLDS",
]

# Verdict thresholds used when params.json does not carry them (seed policy).
DEFAULT_THRESHOLDS = {"max_abs_diff": 5e-3, "p99_abs_diff": 1e-3}

PHASE_COLORS = {
    "load": "#9e9e9e",
    "prefill": "#4c78a8",
    "decode": "#f58518",
    "reference": "#54a24b",
}
_EXTRA_COLORS = ["#b279a2", "#72b7b2", "#eeca3b", "#ff9da6", "#9d755d"]

VERDICT_COLORS = {
    "PASS_EQUIV": "#2e7d32",
    "EXPECTED_DRIFT": "#ef6c00",
}
_FAIL_COLOR = "#c62828"


# --------------------------------------------------------------------------- io


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_json_opt(path: Path) -> Any:
    try:
        return _read_json(path)
    except (OSError, ValueError):
        return None


def _read_obj_opt(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when missing, unreadable or not an object."""
    obj = _read_json_opt(path)
    return obj if isinstance(obj, dict) else None


def _num(x: Any) -> float | None:
    """A finite float, or None for missing / empty / null / non-finite."""
    if x is None or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_vram_samples(run_dir: str | Path) -> list[dict]:
    """Rows of ``vram_samples.csv`` with numbers parsed; empty cells become None."""
    rows = []
    with open(Path(run_dir) / "vram_samples.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append(
                {
                    "t_s": _num(r.get("t_s")),
                    "phase": (r.get("phase") or "").strip(),
                    "device_used_mb": _num(r.get("device_used_mb")),
                    "allocated_mb": _num(r.get("allocated_mb")),
                    "reserved_mb": _num(r.get("reserved_mb")),
                }
            )
    return [r for r in rows if r["t_s"] is not None]


def _thresholds(run_dir: Path) -> dict:
    th = dict(DEFAULT_THRESHOLDS)
    params = _read_json_opt(run_dir / "params.json") or {}
    given = params.get("thresholds") if isinstance(params, dict) else None
    if isinstance(given, dict):
        for k in th:
            v = _num(given.get(k))
            if v is not None and v > 0:
                th[k] = v
    return th


def _fmt_mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f} MB"


def _fmt_diff(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v == 0:
        return "0 (bit-exact)"
    return f"{v:.3g}"


def _fmt_figure(f: Any) -> str:
    """One entry of vram.json's below_floor_figures, whatever its shape."""
    if isinstance(f, dict):
        name = f.get("name") or f.get("figure") or f.get("source") or ""
        val = _num(f.get("value_mb", f.get("mb", f.get("value"))))
        if name and val is not None:
            return f"{name} {val:,.0f} MB"
        return ", ".join(f"{k}={v}" for k, v in f.items())
    return str(f)


def _backend_label(backend: str | None) -> str:
    b = (backend or "").lower()
    if "nvml" in b:
        return "NVML device used"
    if "amdsmi" in b or "rocm" in b:
        return "amdsmi device used"
    if "rss" in b or "psutil" in b or b == "cpu":
        return "process RSS"
    return f"{backend} device used" if backend else "device used"


def _phase_color(name: str, i: int) -> str:
    return PHASE_COLORS.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def _phases(vram: dict, samples: list[dict]) -> list[dict]:
    """Phases from vram.json; if absent, derived from the samples' phase column."""
    out = []
    for p in vram.get("phases") or []:
        s, e = _num(p.get("start_s")), _num(p.get("end_s"))
        if p.get("name") and s is not None:
            out.append({"name": str(p["name"]), "start_s": s, "end_s": e if e is not None else s})
    if out:
        return out
    spans: dict[str, list[float]] = {}
    for r in samples:
        if r["phase"]:
            spans.setdefault(r["phase"], []).append(r["t_s"])
    return [{"name": k, "start_s": min(v), "end_s": max(v)} for k, v in spans.items()]


def _save(fig: Figure, path: str | Path | None, dpi: int = 120) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)


_mb_formatter = FuncFormatter(lambda v, _pos: f"{v:,.0f}")


# ------------------------------------------------------------------------- VRAM


def plot_vram(run_dir: str | Path, path: str | Path | None = None) -> Figure:
    """VRAM (or RSS) over time, with phases, the weights+KV floor and the peaks.

    Reads ``vram_samples.csv`` and ``vram.json``. Returns the Figure; also writes
    a PNG to ``path`` when given.
    """
    run_dir = Path(run_dir)
    vram = _read_json(run_dir / "vram.json")
    samples = read_vram_samples(run_dir)
    phases = _phases(vram, samples)

    backend = vram.get("backend")
    dev_label = _backend_label(backend)
    period = _num(vram.get("sampling_period_sec"))
    n_samples = vram.get("samples_count")
    if n_samples is None:
        n_samples = len(samples)
    below = bool(vram.get("below_floor"))

    fig = Figure(figsize=(11, 6.2), layout="constrained")
    ax = fig.add_subplot()

    t = [r["t_s"] for r in samples]
    few = len(samples) <= 40
    legend_handles: list = []

    # Phase bands first, so every line is drawn over them.
    for i, p in enumerate(phases):
        color = _phase_color(p["name"], i)
        end = p["end_s"] if p["end_s"] > p["start_s"] else p["start_s"]
        if end > p["start_s"]:
            ax.axvspan(p["start_s"], end, color=color, alpha=0.13, lw=0, zorder=0)
        else:
            ax.axvline(p["start_s"], color=color, alpha=0.5, lw=2, zorder=0)
        legend_handles.append(
            Patch(
                facecolor=color,
                alpha=0.35,
                label=f"phase {p['name']} ({p['start_s']:.1f}–{end:.1f} s)",
            )
        )

    def series(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in samples:
            if r[key] is not None:
                xs.append(r["t_s"])
                ys.append(r[key])
        return xs, ys

    all_y: list[float] = []
    for key, label, style in (
        ("device_used_mb", dev_label, dict(color="#1f3b73", lw=2.2, zorder=4)),
        ("reserved_mb", "allocator reserved", dict(color="#8e44ad", lw=1.4, ls="-", zorder=3)),
        ("allocated_mb", "allocator allocated", dict(color="#16a085", lw=1.4, ls="-", zorder=3)),
    ):
        xs, ys = series(key)
        if not ys:
            continue
        (h,) = ax.plot(
            xs, ys, label=label, marker="o" if few else None, ms=4 if few else 0, **style
        )
        legend_handles.append(h)
        all_y += ys

    # Analytic floor: weights + KV. Nothing that holds the model can be below it.
    floor = vram.get("floor") or {}
    floor_total = _num(floor.get("total_mb"))
    if floor_total is not None:
        w, kv = _num(floor.get("weights_mb")), _num(floor.get("kv_cache_mb"))
        parts = f"weights {w:,.0f} + KV {kv:,.0f} = " if w is not None and kv is not None else ""
        h = ax.axhline(floor_total, color=_FAIL_COLOR, ls="--", lw=1.6, zorder=2,
                       label=f"analytic floor: {parts}{floor_total:,.0f} MB")
        legend_handles.append(h)
        all_y.append(floor_total)

    # Allocator exact per-phase peaks (dotted), over their phase when it is known.
    phase_by_name = {p["name"]: p for p in phases}
    peaks = vram.get("allocator_peaks") or {}
    for i, (name, pk) in enumerate(peaks.items()):
        v = _num((pk or {}).get("max_allocated_mb"))
        if v is None or v <= 0:
            continue
        color = _phase_color(name, i)
        label = f"allocator max_allocated ({name}): {v:,.0f} MB"
        ph = phase_by_name.get(name)
        if ph is not None and ph["end_s"] > ph["start_s"]:
            h = ax.hlines(v, ph["start_s"], ph["end_s"], colors=color, linestyles=":",
                          lw=2.4, zorder=5, label=label)
        else:
            h = ax.axhline(v, color=color, ls=":", lw=2.0, zorder=5, label=label)
        legend_handles.append(h)
        all_y.append(v)

    # Sampled peak.
    peak = _num(vram.get("peak_vram_mb"))
    peak_t = _num(vram.get("peak_timestamp_offset_sec"))
    if peak is None or peak_t is None:
        xs, ys = series("device_used_mb")
        if ys:
            j = max(range(len(ys)), key=ys.__getitem__)
            peak, peak_t = ys[j], xs[j]
    if peak is not None and peak_t is not None:
        pcolor = _FAIL_COLOR if below else "#1f3b73"
        ax.plot([peak_t], [peak], marker="*", ms=17, color=pcolor, mec="white", mew=1.0,
                zorder=6, ls="none")
        legend_handles.append(
            Line2D([], [], marker="*", ms=13, color=pcolor, ls="none",
                   label=f"sampled peak: {peak:,.0f} MB @ t={peak_t:.1f} s")
        )
        all_y.append(peak)

    # Limits: y from 0 with headroom for the annotation; x over samples and phases.
    xs_all = t + [p["start_s"] for p in phases] + [p["end_s"] for p in phases]
    if peak_t is not None:
        xs_all.append(peak_t)
    if xs_all:
        x0, x1 = min(xs_all), max(xs_all)
        if x1 - x0 < 1e-9:
            pad = max(period or 1.0, 1.0)
            x0, x1 = x0 - pad, x1 + pad
        else:
            pad = 0.02 * (x1 - x0)
            x0, x1 = x0 - pad, x1 + pad
        ax.set_xlim(x0, x1)
    ymax = max(all_y) if all_y else 1.0
    ax.set_ylim(0, ymax * (1.36 if below else 1.22) if ymax > 0 else 1.0)

    # Phase names inside their bands (bottom edge, where the curves rarely are).
    xl, xr = ax.get_xlim()
    for i, p in enumerate(phases):
        if p["end_s"] - p["start_s"] >= 0.07 * (xr - xl):
            ax.text((p["start_s"] + p["end_s"]) / 2, 0.015, p["name"],
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=10, color=_phase_color(p["name"], i), fontweight="bold",
                    alpha=0.9, zorder=1)

    if peak is not None and peak_t is not None:
        # Put the label on whichever side of the peak has room.
        xl, xr = ax.get_xlim()
        right_side = (peak_t - xl) < 0.6 * (xr - xl)
        # Above the star when it is the top of the plot, below it when other
        # lines (allocator, floor) run above it.
        above = peak >= 0.8 * ymax
        ax.annotate(
            f"sampled peak {peak:,.0f} MB\n@ t = {peak_t:.1f} s",
            xy=(peak_t, peak),
            xytext=(28 if right_side else -28, 22 if above else -34),
            textcoords="offset points",
            ha="left" if right_side else "right",
            va="bottom" if above else "top",
            multialignment="left",
            fontsize=10,
            color=_FAIL_COLOR if below else "#1f3b73",
            bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.7", alpha=0.9),
            arrowprops=dict(arrowstyle="-", color="0.4", lw=0.8),
            zorder=7,
        )

    if not samples:
        ax.text(0.5, 0.5, "no VRAM samples recorded", transform=ax.transAxes,
                ha="center", va="center", fontsize=13, color="0.4")

    if below:
        figs = vram.get("below_floor_figures") or []
        detail = ", ".join(_fmt_figure(f) for f in figs[:3]) if figs else "a measured peak"
        if len(figs) > 3:
            detail += ", …"
        ax.text(
            0.01, 0.985,
            f"⚠ BELOW FLOOR: {detail} < weights+KV.\n"
            "A peak that should hold the model cannot be smaller than the floor:\n"
            "the measurement (or the claimed context) is wrong.",
            transform=ax.transAxes, ha="left", va="top", fontsize=9.5, color=_FAIL_COLOR,
            bbox=dict(boxstyle="round,pad=0.4", fc="#fdecea", ec=_FAIL_COLOR),
            zorder=8,
        )

    ax.yaxis.set_major_formatter(_mb_formatter)
    ax.set_ylabel("memory (MB)")
    ax.set_xlabel("time since sampling start (s)")
    ax.grid(True, axis="y", alpha=0.3)

    device = vram.get("device_info") or "unknown device"
    per = f"{period:g} s period" if period is not None else "period n/a"
    what = "Process memory (RSS)" if dev_label == "process RSS" else "VRAM"
    s_ = "" if n_samples == 1 else "s"
    title = f"{what} — {device}   [{backend or '?'}, {per}, {n_samples} sample{s_}]"
    fb = vram.get("fallback_reason")
    sub = f"fallback: {fb}" if fb else None
    if below:
        fig.suptitle(title + "\n⚠ measured peak is BELOW the analytic weights+KV floor",
                     fontsize=12.5, color=_FAIL_COLOR, fontweight="bold")
    else:
        fig.suptitle(title, fontsize=12.5)
    if sub:
        ax.set_title(sub, fontsize=9.5, color="0.35")

    ncol = 2 if len(legend_handles) > 3 else len(legend_handles) or 1
    if legend_handles:
        fig.legend(handles=legend_handles, loc="outside lower center", ncol=ncol,
                   fontsize=9, frameon=False)
    _save(fig, path)
    return fig


# ------------------------------------------------------------------ equivalence


def _log_floor(values: list[float], thresholds: dict) -> float:
    """A value below every positive datum and threshold, a decade under them."""
    pos = [v for v in values if v > 0] + [v for v in thresholds.values() if v > 0]
    lo = min(pos) if pos else 1e-3
    return 10 ** (math.floor(math.log10(lo)) - 1)


def plot_equivalence(run_dir: str | Path, path: str | Path | None = None,
                     metrics: dict | None = None) -> Figure:
    """Per-step |Δlogit| (log y) and cosine, decode vs reference, titled by the verdict.

    Reads ``metrics.json`` (unless ``metrics`` is given, e.g. recomputed by
    :func:`greta.checks.analyze.analyze_run`), ``verdict.json`` and (for thresholds) ``params.json``.
    Zeros cannot be drawn on a log axis: they are drawn on a floor line a decade
    under the smallest datum, labelled "0 (bit-exact)".
    """
    run_dir = Path(run_dir)
    if metrics is None:
        metrics = _read_obj_opt(run_dir / "metrics.json") or {}
    verdict = _read_obj_opt(run_dir / "verdict.json") or {}
    th = _thresholds(run_dir)
    rows = [r for r in (metrics.get("per_position") or []) if isinstance(r, dict)]
    rows.sort(key=lambda r: (r.get("step") is None, r.get("step")))

    vname = verdict.get("verdict") or "NO VERDICT"
    vcolor = VERDICT_COLORS.get(vname, _FAIL_COLOR)
    reason = verdict.get("reason") or ""

    if rows:
        fig = Figure(figsize=(11, 7.2), layout="constrained")
        ax, axc = fig.subplots(2, 1, sharex=True, height_ratios=[2.3, 1])
    else:
        fig = Figure(figsize=(11, 3.2), layout="constrained")
        ax = axc = fig.add_subplot()

    steps = [r.get("step") for r in rows]
    steps = [s if isinstance(s, (int, float)) else i for i, s in enumerate(steps)]
    mx = [_num(r.get("max_abs_diff")) for r in rows]
    mn = [_num(r.get("mean_abs_diff")) for r in rows]
    cos = [_num(r.get("cosine")) for r in rows]
    disagree = [s for s, r in zip(steps, rows) if r.get("agree") is False]

    handles: list = []
    if not rows:
        failed = verdict.get("failed_phase")
        msg = "no per-position metrics in this run"
        if failed:
            msg += f"\n(failed phase: {failed})"
        ax.text(0.5, 0.5, msg, transform=ax.transAxes, ha="center", va="center",
                fontsize=13, color="0.4")
        ax.set_yticks([])
        ax.set_xticks([])
    else:
        finite = [v for v in mx + mn if v is not None]
        zfloor = _log_floor(finite, th)
        ax.set_yscale("log")

        def draw(vals, color, marker, label, lw):
            ys = [zfloor if v == 0 else v for v in vals]
            xs_ok = [s for s, v in zip(steps, vals) if v is not None]
            ys_ok = [y for y, v in zip(ys, vals) if v is not None]
            (h,) = ax.plot(xs_ok, ys_ok, color=color, marker=marker, ms=5, lw=lw,
                           label=label, zorder=4)
            handles.append(h)
            zx = [s for s, v in zip(steps, vals) if v == 0]
            if zx:
                ax.plot(zx, [zfloor] * len(zx), ls="none", marker=marker, ms=8,
                        mfc="white", mec=color, mew=1.6, zorder=5)

        draw(mx, "#c0392b", "o", "max |Δlogit| per step", 1.8)
        draw(mn, "#2874a6", "s", "mean |Δlogit| per step", 1.4)

        any_zero = any(v == 0 for v in mx + mn)
        if any_zero:
            ax.axhline(zfloor, color="#2e7d32", lw=1.0, ls="-", alpha=0.6, zorder=1)
            handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="0.3",
                                  ms=8, label="hollow marker = exactly 0 (bit-exact)"))

        ax.axhline(th["max_abs_diff"], color="#c0392b", ls="--", lw=1.3, zorder=2)
        handles.append(Line2D([], [], color="#c0392b", ls="--",
                              label=f"max_abs threshold {th['max_abs_diff']:g}"))
        ax.axhline(th["p99_abs_diff"], color="#7d3c98", ls="-.", lw=1.3, zorder=2)
        handles.append(Line2D([], [], color="#7d3c98", ls="-.",
                              label=f"p99 threshold {th['p99_abs_diff']:g} (over all logits)"))

        nonfinite = [s for s, v, r in zip(steps, mx, rows)
                     if v is None and r.get("max_abs_diff") is not None]
        top = max(finite + list(th.values())) * 30
        lo = zfloor / 3
        ax.set_ylim(lo, top)
        if nonfinite:
            ax.plot(nonfinite, [top / 2] * len(nonfinite), ls="none", marker="^",
                    color=_FAIL_COLOR, ms=10, zorder=6)
            handles.append(Line2D([], [], ls="none", marker="^", color=_FAIL_COLOR,
                                  label="non-finite diff (NaN/inf)"))

        # The floor's tick reads "0 (bit-exact)"; the real decades above it.
        def _fmt(v, _pos):
            e = round(math.log10(v))
            if any_zero and abs(math.log10(v) - math.log10(zfloor)) < 1e-6:
                return "0 (bit-exact)"
            return f"$10^{{{e}}}$"

        ax.yaxis.set_major_formatter(FuncFormatter(_fmt))
        if all(v == 0 for v in mx if v is not None) and any(v is not None for v in mx):
            ax.text(0.5, 0.28, f"all {len(rows)} steps bit-exact: decode logits == reference logits",
                    transform=ax.transAxes, ha="center", va="center", fontsize=12,
                    color="#2e7d32", bbox=dict(fc="white", ec="#2e7d32", alpha=0.9))

        for a in (ax, axc):
            for j, s in enumerate(disagree):
                a.axvspan(s - 0.4, s + 0.4, color=_FAIL_COLOR, alpha=0.14, lw=0, zorder=0)
        if disagree:
            handles.append(Patch(facecolor=_FAIL_COLOR, alpha=0.25,
                                 label=f"argmax disagrees ({len(disagree)} step"
                                       f"{'s' if len(disagree) != 1 else ''})"))
            first = metrics.get("first_argmax_mismatch")
            if first is None:
                first = disagree[0]
            ax.annotate(f"first argmax mismatch: step {first}",
                        xy=(first, top / 2), xytext=(6, 0), textcoords="offset points",
                        ha="left", va="center", fontsize=9, color=_FAIL_COLOR, zorder=7)

        ax.set_ylabel("|logit_decode − logit_reference|")
        ax.grid(True, which="major", axis="y", alpha=0.3)

        # Cosine panel.
        cs = [(s, c) for s, c in zip(steps, cos) if c is not None]
        if cs:
            axc.plot([s for s, _ in cs], [c for _, c in cs], color="#117a65", marker="o",
                     ms=5, lw=1.6, zorder=4)
            cmin = min(c for _, c in cs)
            if cmin >= 1.0 - 1e-12:
                axc.set_ylim(1 - 1e-6, 1 + 1e-6)
            fmt = ScalarFormatter(useOffset=False)
            fmt.set_scientific(False)
            axc.yaxis.set_major_formatter(fmt)
            axc.set_title(f"min cosine {cmin:.9f}", loc="right", fontsize=9, color="0.3")
        axc.set_ylabel("cosine similarity")
        axc.grid(True, axis="y", alpha=0.3)

        # Integer steps; label step 0 as the prefill logits.
        n = len(steps)
        stride = 1 if n <= 24 else max(1, math.ceil(n / 24))
        ticks = [s for s in steps if int(s) % stride == 0]
        axc.set_xticks(ticks)
        src = {s: r.get("source") for s, r in zip(steps, rows)}
        axc.set_xticklabels([f"{s}\n{src[s]}" if src.get(s) == "prefill" else f"{s}"
                             for s in ticks], fontsize=9)
        axc.set_xlim(min(steps) - 0.6, max(steps) + 0.6)
        axc.set_xlabel("step (0 = last prompt position, from prefill; 1… = decode steps)")

    # Title: the verdict, big and coloured; the key numbers beneath.
    summary = []
    for key, label in (("max_abs_diff", "max"), ("p99_abs_diff", "p99"),
                       ("mean_abs_diff", "mean")):
        v = metrics.get(key)
        if v is not None:
            summary.append(f"{label} |Δ| {_fmt_diff(_num(v))}")
    if metrics.get("top1_agreement") is not None:
        summary.append(f"top-1 {float(metrics['top1_agreement']):.4f}")
    if verdict.get("kv_aligned") is not None:
        summary.append(f"kv_aligned={verdict.get('kv_aligned')}")
    fig.suptitle(vname, fontsize=17, fontweight="bold", color=vcolor)
    sub = reason if len(reason) <= 120 else reason[:117] + "…"
    ax.set_title((sub + "\n" if sub else "") + "   ".join(summary), fontsize=10, color="0.2")

    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9,
                   frameon=False)
    _save(fig, path)
    return fig


# ----------------------------------------------------------------------- tables


TOP1_COLUMNS = ["step", "position", "source", "argmax_decode", "argmax_reference", "agree",
                "max_abs_diff"]


def top1_table(run_dir: str | Path, metrics: dict | None = None) -> list[dict]:
    """One row per compared step: where the two paths' top-1 token agrees or not.

    From ``metrics.json`` unless ``metrics`` is given."""
    if metrics is None:
        metrics = _read_obj_opt(Path(run_dir) / "metrics.json") or {}
    rows = metrics.get("per_position")
    return [{k: r.get(k) for k in TOP1_COLUMNS} for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


_DIFF_KEYS = ("max_abs_diff", "p99_abs_diff", "mean_abs_diff")


def _fmt_float(v: float) -> str:
    # Cosines and agreement rates live just under 1: show the digits that matter.
    if 0 < abs(1 - v) < 1e-3:
        return f"{v:.9f}"
    return f"{v:.4g}"


def table_md(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (pandas-free).

    None shows as "—", booleans as ✓ / ✗, and an exact 0 in a |Δ| column
    (``max_abs_diff`` etc.) as "0 (bit-exact)".
    """
    if not rows:
        return "_(no rows)_"
    columns = columns or list(rows[0])

    def cell(v: Any, col: str) -> str:
        if v is None:
            return "—"
        if isinstance(v, bool):
            return "✓" if v else "**✗**"
        if isinstance(v, float):
            if v == 0 and col in _DIFF_KEYS:
                return "0 (bit-exact)"
            return _fmt_float(v)
        return str(v).replace("|", "\\|")

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def results_table_md(run_dir: str | Path) -> str:
    """The results table of ``report.md`` (the record writer owns it), or ''."""
    try:
        text = (Path(run_dir) / "report.md").read_text(encoding="utf-8")
    except OSError:
        return ""
    blocks = re.findall(r"(?:^\|.*\|[ \t]*\n?)+", text, flags=re.M)
    for b in blocks:
        if "verdict" in b.lower():
            return b.strip()
    return blocks[0].strip() if blocks else ""


def verdict_md(run_dir: str | Path) -> str:
    """The verdict as a prominent markdown block."""
    v = _read_obj_opt(Path(run_dir) / "verdict.json")
    if not v:
        return "## Verdict: **missing** — `verdict.json` not found or unreadable"
    lines = [f"## Verdict: **{v.get('verdict', '?')}**", "", f"> {v.get('reason') or ''}", ""]
    extra = []
    for k in ("failed_phase", "bit_exact", "kv_aligned"):
        if k in v:
            extra.append(f"`{k}` = `{json.dumps(v[k])}`")
    if extra:
        lines.append(" · ".join(extra))
    return "\n".join(lines)


def metrics_summary_md(run_dir: str | Path, metrics: dict | None = None) -> str:
    """The scalar part of metrics.json (or of ``metrics``) as a two-column markdown table."""
    m = metrics if metrics is not None else _read_obj_opt(Path(run_dir) / "metrics.json")
    if not m:
        return "_metrics.json not found: no comparison was made in this run._"
    rows = [{"metric": k, "value": _fmt_diff(_num(m[k])) if k in _DIFF_KEYS and m[k] is not None
             else m[k]} for k in m if k != "per_position"]
    out = table_md(rows, ["metric", "value"])
    th = _thresholds(Path(run_dir))
    return out + (f"\n\nThresholds: max_abs_diff ≤ {th['max_abs_diff']:g}, "
                  f"p99_abs_diff ≤ {th['p99_abs_diff']:g}.")


def vram_summary_md(run_dir: str | Path) -> str:
    """The key figures of vram.json as a markdown table."""
    v = _read_json(Path(run_dir) / "vram.json")
    floor = v.get("floor") or {}
    rows = [
        {"figure": "device", "value": v.get("device_info")},
        {"figure": "backend", "value": v.get("backend")
         + (f" (fallback: {v['fallback_reason']})" if v.get("fallback_reason") else "")
         if v.get("backend") else None},
        {"figure": "sampling period", "value": f"{v.get('sampling_period_sec')} s"},
        {"figure": "samples", "value": v.get("samples_count")},
        {"figure": "sampled peak", "value": f"{_fmt_mb(_num(v.get('peak_vram_mb')))} "
                                            f"@ t={v.get('peak_timestamp_offset_sec')} s"},
        {"figure": "floor (weights + KV)",
         "value": f"{_fmt_mb(_num(floor.get('weights_mb')))} + "
                  f"{_fmt_mb(_num(floor.get('kv_cache_mb')))} = "
                  f"{_fmt_mb(_num(floor.get('total_mb')))}"},
    ]
    for name, pk in (v.get("allocator_peaks") or {}).items():
        rows.append({"figure": f"allocator peak ({name})",
                     "value": f"allocated {_fmt_mb(_num(pk.get('max_allocated_mb')))}, "
                              f"reserved {_fmt_mb(_num(pk.get('max_reserved_mb')))}"})
    below = bool(v.get("below_floor"))
    rows.append({"figure": "below_floor",
                 "value": "**⚠ TRUE** — " + ", ".join(_fmt_figure(f) for f in
                                                      v.get("below_floor_figures") or [])
                 if below else "false"})
    return table_md(rows, ["figure", "value"])
