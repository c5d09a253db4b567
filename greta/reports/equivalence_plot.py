"""Per-step |Δlogit| (log y) and cosine, decode vs reference, titled by the verdict: :func:`equivalence_series`
reads a run into an :class:`EquivalencePlotData` (tested on its own), :func:`draw_equivalence` draws it;
:func:`plot_equivalence` does both.

Zeros cannot be drawn on a log axis: they sit on a floor line a decade under the smallest positive datum or
threshold, labelled "0 (bit-exact)"; a threshold of 0 is drawn on that line too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, ScalarFormatter

from greta.reports import fmt
from greta.reports.fmt import finite
from greta.reports.plot_style import FAIL_COLOR, VERDICT_COLORS, log_floor, on_log_axis, save
from greta.reports.run_files import read_obj_opt, thresholds

__all__ = ["EquivalencePlotData", "equivalence_series", "draw_equivalence", "plot_equivalence"]


@dataclass
class EquivalencePlotData:
    """Everything the equivalence figure shows; per-step lists are aligned with ``steps``."""
    verdict: str  # "NO VERDICT" without verdict.json
    reason: str
    failed_phase: str | None
    kv_aligned: object
    steps: list[float]
    sources: list[str | None]
    max_abs: list[float | None]  # None: missing or non-finite
    mean_abs: list[float | None]
    cosine: list[float | None]
    nonfinite_steps: list[float]  # steps whose max |Δ| is recorded but not finite (NaN / inf)
    disagree_steps: list[float]  # steps where the two paths' argmax differs
    first_mismatch: float | None
    thresholds: dict  # max_abs_diff, p99_abs_diff: as params.json gives them (0 stays 0)
    summary: dict  # max_abs_diff, p99_abs_diff, mean_abs_diff, top1_agreement: run-level figures or None


def equivalence_series(run_dir: str | Path, metrics: dict | None = None) -> EquivalencePlotData:
    """The figure's data from ``metrics.json`` (unless ``metrics`` is given, e.g. recomputed by
    :func:`greta.checks.analyze.analyze_run`), ``verdict.json`` and ``params.json`` (thresholds)."""
    run_dir = Path(run_dir)
    if metrics is None:
        metrics = read_obj_opt(run_dir / "metrics.json") or {}
    verdict = read_obj_opt(run_dir / "verdict.json") or {}
    rows = [r for r in (metrics.get("per_position") or []) if isinstance(r, dict)]
    rows.sort(key=lambda r: (r.get("step") is None, r.get("step")))
    steps = [s if isinstance(s, (int, float)) else i for i, s in enumerate(r.get("step") for r in rows)]
    max_abs = [finite(r.get("max_abs_diff")) for r in rows]
    disagree = [s for s, r in zip(steps, rows) if r.get("agree") is False]
    first = metrics.get("first_argmax_mismatch")
    return EquivalencePlotData(
        verdict=verdict.get("verdict") or "NO VERDICT", reason=verdict.get("reason") or "",
        failed_phase=verdict.get("failed_phase"), kv_aligned=verdict.get("kv_aligned"), steps=steps,
        sources=[r.get("source") for r in rows], max_abs=max_abs,
        mean_abs=[finite(r.get("mean_abs_diff")) for r in rows], cosine=[finite(r.get("cosine")) for r in rows],
        nonfinite_steps=[s for s, v, r in zip(steps, max_abs, rows) if v is None and r.get("max_abs_diff") is not None],
        disagree_steps=disagree, first_mismatch=first if first is not None else (disagree[0] if disagree else None),
        thresholds=thresholds(run_dir),
        summary={k: finite(metrics.get(k)) for k in ("max_abs_diff", "p99_abs_diff", "mean_abs_diff", "top1_agreement")})


# ----------------------------------------------------------------------------------------------------- drawing
def _zero_tick_formatter(zero: float, zero_drawn: bool) -> FuncFormatter:
    """Decades as 10^e; the floor line's tick reads "0 (bit-exact)" when something is drawn on it."""
    def label(v, _pos):
        if zero_drawn and abs(math.log10(v) - math.log10(zero)) < 1e-6:
            return "0 (bit-exact)"
        return f"$10^{{{round(math.log10(v))}}}$"
    return FuncFormatter(label)


def _draw_diffs(ax, d: EquivalencePlotData) -> tuple[list, float]:
    """The per-step max and mean |Δ|, the thresholds and the non-finite marks; (legend handles, plot top)."""
    finite_vals = [v for v in d.max_abs + d.mean_abs if v is not None]
    ths = [d.thresholds["max_abs_diff"], d.thresholds["p99_abs_diff"]]
    zero = log_floor(finite_vals, ths)
    ax.set_yscale("log")
    handles = []
    for vals, color, marker, label, lw in ((d.max_abs, "#c0392b", "o", "max |Δlogit| per step", 1.8),
                                           (d.mean_abs, "#2874a6", "s", "mean |Δlogit| per step", 1.4)):
        pts = [(s, on_log_axis(v, zero)) for s, v in zip(d.steps, vals) if v is not None]
        (h,) = ax.plot([s for s, _ in pts], [y for _, y in pts], color=color, marker=marker, ms=5, lw=lw,
                       label=label, zorder=4)
        handles.append(h)
        zx = [s for s, v in zip(d.steps, vals) if v == 0]
        if zx:  # a hollow marker: exactly 0
            ax.plot(zx, [zero] * len(zx), ls="none", marker=marker, ms=8, mfc="white", mec=color, mew=1.6, zorder=5)
    any_zero = any(v == 0 for v in finite_vals)
    if any_zero:
        ax.axhline(zero, color="#2e7d32", lw=1.0, ls="-", alpha=0.6, zorder=1)
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="0.3", ms=8,
                              label="hollow marker = exactly 0 (bit-exact)"))
    for key, color, ls, label in (("max_abs_diff", "#c0392b", "--", "max_abs threshold {}"),
                                  ("p99_abs_diff", "#7d3c98", "-.", "p99 threshold {} (over all logits)")):
        ax.axhline(on_log_axis(d.thresholds[key], zero), color=color, ls=ls, lw=1.3, zorder=2)
        handles.append(Line2D([], [], color=color, ls=ls, label=label.format(fmt.threshold(d.thresholds[key]))))
    top = max([v for v in finite_vals + ths if v > 0] or [zero * 10]) * 30
    ax.set_ylim(zero / 3, top)
    if d.nonfinite_steps:
        ax.plot(d.nonfinite_steps, [top / 2] * len(d.nonfinite_steps), ls="none", marker="^", color=FAIL_COLOR,
                ms=10, zorder=6)
        handles.append(Line2D([], [], ls="none", marker="^", color=FAIL_COLOR, label="non-finite diff (NaN/inf)"))
    ax.yaxis.set_major_formatter(_zero_tick_formatter(zero, any_zero or min(ths) == 0))
    mx = [v for v in d.max_abs if v is not None]
    if mx and all(v == 0 for v in mx):
        ax.text(0.5, 0.28, f"all {len(d.steps)} steps bit-exact: decode logits == reference logits",
                transform=ax.transAxes, ha="center", va="center", fontsize=12, color="#2e7d32",
                bbox=dict(fc="white", ec="#2e7d32", alpha=0.9))
    ax.set_ylabel("|logit_decode − logit_reference|")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    return handles, top


def _draw_disagreements(ax, axc, d: EquivalencePlotData, top: float) -> list:
    for a in (ax, axc):
        for s in d.disagree_steps:
            a.axvspan(s - 0.4, s + 0.4, color=FAIL_COLOR, alpha=0.14, lw=0, zorder=0)
    if not d.disagree_steps:
        return []
    n = len(d.disagree_steps)
    ax.annotate(f"first argmax mismatch: step {d.first_mismatch}", xy=(d.first_mismatch, top / 2), xytext=(6, 0),
                textcoords="offset points", ha="left", va="center", fontsize=9, color=FAIL_COLOR, zorder=7)
    return [Patch(facecolor=FAIL_COLOR, alpha=0.25, label=f"argmax disagrees ({n} step{'s' if n != 1 else ''})")]


def _draw_cosine_and_steps(axc, d: EquivalencePlotData) -> None:
    cs = [(s, c) for s, c in zip(d.steps, d.cosine) if c is not None]
    if cs:
        axc.plot([s for s, _ in cs], [c for _, c in cs], color="#117a65", marker="o", ms=5, lw=1.6, zorder=4)
        cmin = min(c for _, c in cs)
        if cmin >= 1.0 - 1e-12:
            axc.set_ylim(1 - 1e-6, 1 + 1e-6)
        plain = ScalarFormatter(useOffset=False)
        plain.set_scientific(False)
        axc.yaxis.set_major_formatter(plain)
        axc.set_title(f"min cosine {cmin:.9f}", loc="right", fontsize=9, color="0.3")
    axc.set_ylabel("cosine similarity")
    axc.grid(True, axis="y", alpha=0.3)
    stride = 1 if len(d.steps) <= 24 else max(1, math.ceil(len(d.steps) / 24))  # integer steps, at most ~24 ticks
    ticks = [s for s in d.steps if int(s) % stride == 0]
    src = dict(zip(d.steps, d.sources))
    axc.set_xticks(ticks)
    axc.set_xticklabels([f"{s}\n{src[s]}" if src.get(s) == "prefill" else f"{s}" for s in ticks], fontsize=9)
    axc.set_xlim(min(d.steps) - 0.6, max(d.steps) + 0.6)
    axc.set_xlabel("step (0 = last prompt position, from prefill; 1… = decode steps)")


def _title(fig, ax, d: EquivalencePlotData) -> None:
    """The verdict, big and coloured; the reason and the key numbers beneath."""
    s = d.summary
    parts = [f"{label} |Δ| {fmt.diff(s[key])}" for key, label in
             (("max_abs_diff", "max"), ("p99_abs_diff", "p99"), ("mean_abs_diff", "mean")) if s[key] is not None]
    if s["top1_agreement"] is not None:
        parts.append(f"top-1 {s['top1_agreement']:.4f}")
    if d.kv_aligned is not None:
        parts.append(f"kv_aligned={d.kv_aligned}")
    fig.suptitle(d.verdict, fontsize=17, fontweight="bold", color=VERDICT_COLORS.get(d.verdict, FAIL_COLOR))
    sub = d.reason if len(d.reason) <= 120 else d.reason[:117] + "…"
    ax.set_title((sub + "\n" if sub else "") + "   ".join(parts), fontsize=10, color="0.2")


def draw_equivalence(d: EquivalencePlotData, path: str | Path | None = None) -> Figure:
    """The equivalence figure; also writes a PNG to ``path`` when given."""
    handles: list = []
    if d.steps:
        fig = Figure(figsize=(11, 7.2), layout="constrained")
        ax, axc = fig.subplots(2, 1, sharex=True, height_ratios=[2.3, 1])
        handles, top = _draw_diffs(ax, d)
        handles += _draw_disagreements(ax, axc, d, top)
        _draw_cosine_and_steps(axc, d)
    else:
        fig = Figure(figsize=(11, 3.2), layout="constrained")
        ax = fig.add_subplot()
        msg = "no per-position metrics in this run" + (f"\n(failed phase: {d.failed_phase})" if d.failed_phase else "")
        ax.text(0.5, 0.5, msg, transform=ax.transAxes, ha="center", va="center", fontsize=13, color="0.4")
        ax.set_yticks([])
        ax.set_xticks([])
    _title(fig, ax, d)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    save(fig, path)
    return fig


def plot_equivalence(run_dir: str | Path, path: str | Path | None = None, metrics: dict | None = None) -> Figure:
    """:func:`draw_equivalence` of :func:`equivalence_series`."""
    return draw_equivalence(equivalence_series(run_dir, metrics), path)
