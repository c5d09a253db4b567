"""VRAM (or RSS) over time for one run: :func:`vram_series` reads ``vram.json`` and ``vram_samples.csv`` into a
:class:`VramPlotData` (tested on its own), :func:`draw_vram` draws it; :func:`plot_vram` does both.

A missing ``vram.json`` / ``vram_samples.csv`` raises: it means the record itself is broken.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from greta.reports.fmt import finite
from greta.reports.plot_style import FAIL_COLOR, mb_formatter, phase_color, save
from greta.reports.run_files import read_json, read_vram_samples

__all__ = ["Phase", "VramPlotData", "vram_series", "draw_vram", "plot_vram", "SERIES"]

# (samples column, legend label or None for the backend's own label, line style)
SERIES = (("device_used_mb", None, dict(color="#1f3b73", lw=2.2, zorder=4)),
          ("reserved_mb", "allocator reserved", dict(color="#8e44ad", lw=1.4, ls="-", zorder=3)),
          ("allocated_mb", "allocator allocated", dict(color="#16a085", lw=1.4, ls="-", zorder=3)))
_BACKEND_LABELS = {"nvml": "NVML device used", "amdsmi": "amdsmi device used", "rss": "process RSS"}
RANK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")  # rank r: RANK_MARKERS[r], at its own offset
RANK_DASHES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)))


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float
    end_s: float


@dataclass
class VramPlotData:
    """Everything the VRAM figure shows, in MiB and seconds since sampling started."""
    device: str
    backend: str | None
    device_label: str  # what the main line measures: "NVML device used", "process RSS", ...
    period_s: float | None
    n_samples: int
    fallback_reason: str | None
    phases: list[Phase]
    series: dict[str, tuple[list[float], list[float]]]  # samples column -> (t, MiB), only columns with data
    floor_mb: float | None
    weights_mb: float | None
    kv_cache_mb: float | None
    allocator_peaks: dict[str, float]  # phase -> max allocated MiB (> 0)
    peak: tuple[float, float] | None  # (MiB, t)
    below_floor: bool
    below_floor_figures: list[str] = field(default_factory=list)
    sample_times: list[float] = field(default_factory=list)
    ranks: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)  # tp > 1: rank -> (t, MiB)


def _rank_series(run_dir: Path) -> dict[int, tuple[list[float], list[float]]]:
    """Each rank's sampled device figure from vram_samples_ranks.csv (tensor-parallel records; {} otherwise)."""
    from greta.record.samples import RANK_SAMPLES_CSV, read_rank_samples_csv

    path = run_dir / RANK_SAMPLES_CSV
    if not path.is_file():
        return {}
    out = {}
    for r, rows in read_rank_samples_csv(path).items():
        pts = [(x["t_s"], x["device_used_mb"]) for x in rows if x["t_s"] is not None and x["device_used_mb"] is not None]
        out[r] = ([t for t, _ in pts], [y for _, y in pts])
    return out


def _phases(vram: dict, samples: list[dict]) -> list[Phase]:
    """Phases from vram.json; if absent, derived from the samples' phase column."""
    out = []
    for p in vram.get("phases") or []:
        s, e = finite(p.get("start_s")), finite(p.get("end_s"))
        if p.get("name") and s is not None:
            out.append(Phase(str(p["name"]), s, max(e, s) if e is not None else s))
    if out:
        return out
    spans: dict[str, list[float]] = {}
    for r in samples:
        if r["phase"]:
            spans.setdefault(r["phase"], []).append(r["t_s"])
    return [Phase(k, min(v), max(v)) for k, v in spans.items()]


def vram_series(run_dir: str | Path) -> VramPlotData:
    """The VRAM figure's data from ``vram.json`` and ``vram_samples.csv`` of ``run_dir``."""
    run_dir = Path(run_dir)
    vram = read_json(run_dir / "vram.json")
    samples = read_vram_samples(run_dir)
    series = {}
    for key, _, _ in SERIES:
        pts = [(r["t_s"], r[key]) for r in samples if r[key] is not None]
        if pts:
            series[key] = ([t for t, _ in pts], [v for _, v in pts])
    peak_mb, peak_t = finite(vram.get("peak_vram_mb")), finite(vram.get("peak_timestamp_offset_sec"))
    if (peak_mb is None or peak_t is None) and "device_used_mb" in series:
        ts, ys = series["device_used_mb"]
        j = max(range(len(ys)), key=ys.__getitem__)
        peak_mb, peak_t = ys[j], ts[j]
    floor = vram.get("floor") or {}
    peaks = {str(name): finite((pk or {}).get("max_allocated_mb"))
             for name, pk in (vram.get("allocator_peaks") or {}).items()}
    backend = vram.get("backend")
    n = vram.get("samples_count")
    return VramPlotData(
        device=str(vram.get("device_info") or "unknown device"), backend=backend,
        device_label=_BACKEND_LABELS.get(backend, f"{backend} device used" if backend else "device used"),
        period_s=finite(vram.get("sampling_period_sec")), n_samples=len(samples) if n is None else int(n),
        fallback_reason=vram.get("fallback_reason"), phases=_phases(vram, samples), series=series,
        floor_mb=finite(floor.get("total_mb")), weights_mb=finite(floor.get("weights_mb")),
        kv_cache_mb=finite(floor.get("kv_cache_mb")),
        allocator_peaks={k: v for k, v in peaks.items() if v is not None and v > 0},
        peak=(peak_mb, peak_t) if peak_mb is not None and peak_t is not None else None,
        below_floor=bool(vram.get("below_floor")),
        below_floor_figures=[str(f) for f in vram.get("below_floor_figures") or []],
        sample_times=[r["t_s"] for r in samples], ranks=_rank_series(run_dir))


# ----------------------------------------------------------------------------------------------------- drawing
def _draw_phases(ax, d: VramPlotData) -> list:
    handles = []
    for i, p in enumerate(d.phases):
        color = phase_color(p.name, i)
        if p.end_s > p.start_s:
            ax.axvspan(p.start_s, p.end_s, color=color, alpha=0.13, lw=0, zorder=0)
        else:
            ax.axvline(p.start_s, color=color, alpha=0.5, lw=2, zorder=0)
        handles.append(Patch(facecolor=color, alpha=0.35, label=f"phase {p.name} ({p.start_s:.1f}–{p.end_s:.1f} s)"))
    return handles


def _draw_lines(ax, d: VramPlotData) -> tuple[list, list[float]]:
    """The sampled series, the floor, the allocator peaks and the sampled peak; (legend handles, every y)."""
    handles, all_y = [], []
    few = len(d.sample_times) <= 40
    for key, label, style in SERIES:
        if key in d.series:
            xs, ys = d.series[key]
            label = label or (f"rank 0: {d.device_label}" if d.ranks else d.device_label)
            (h,) = ax.plot(xs, ys, label=label, marker="o" if few else None, ms=4 if few else 0,
                           **style)
            handles.append(h)
            all_y += ys
    n = max(len(d.ranks), 1)
    for r, (xs, ys) in sorted(d.ranks.items()):  # tensor parallel: one line per other rank (rank 0 is above)
        if r and xs:
            # equal ranks draw the same curve: each gets its own marker, set at its own offset along the samples,
            # and its own dash, so a rank lying exactly under another still shows
            every = max(len(xs) // 12, n)
            (h,) = ax.plot(xs, ys, lw=1.3, ls=RANK_DASHES[r % len(RANK_DASHES)], alpha=0.9, zorder=3 + r / n,
                           marker=RANK_MARKERS[r % len(RANK_MARKERS)], ms=6, markevery=(r * every // n, every),
                           label=f"rank {r}: {d.device_label}")
            handles.append(h)
            all_y += ys
    if d.floor_mb is not None:  # nothing that holds the model can be below weights + KV
        parts = (f"weights {d.weights_mb:,.0f} + KV {d.kv_cache_mb:,.0f} = "
                 if d.weights_mb is not None and d.kv_cache_mb is not None else "")
        handles.append(ax.axhline(d.floor_mb, color=FAIL_COLOR, ls="--", lw=1.6, zorder=2,
                                  label=f"analytic floor{' per rank' if d.ranks else ''}: {parts}{d.floor_mb:,.0f} MiB"))
        all_y.append(d.floor_mb)
    by_name = {p.name: p for p in d.phases}
    for i, (name, v) in enumerate(d.allocator_peaks.items()):
        color, label = phase_color(name, i), f"allocator max_allocated ({name}): {v:,.0f} MiB"
        ph = by_name.get(name)
        if ph is not None and ph.end_s > ph.start_s:  # exact per-phase peak, over its phase
            h = ax.hlines(v, ph.start_s, ph.end_s, colors=color, linestyles=":", lw=2.4, zorder=5, label=label)
        else:
            h = ax.axhline(v, color=color, ls=":", lw=2.0, zorder=5, label=label)
        handles.append(h)
        all_y.append(v)
    if d.peak is not None:
        peak, t = d.peak
        color = FAIL_COLOR if d.below_floor else "#1f3b73"
        ax.plot([t], [peak], marker="*", ms=17, color=color, mec="white", mew=1.0, zorder=6, ls="none")
        handles.append(Line2D([], [], marker="*", ms=13, color=color, ls="none",
                              label=f"sampled peak: {peak:,.0f} MiB @ t={t:.1f} s"))
        all_y.append(peak)
    return handles, all_y


def _set_limits(ax, d: VramPlotData, ymax: float) -> None:
    """y from 0 with headroom for the annotations; x over the samples, the phases and the peak."""
    xs = d.sample_times + [p.start_s for p in d.phases] + [p.end_s for p in d.phases]
    if d.peak is not None:
        xs.append(d.peak[1])
    if xs:
        x0, x1 = min(xs), max(xs)
        pad = max(d.period_s or 1.0, 1.0) if x1 - x0 < 1e-9 else 0.02 * (x1 - x0)
        ax.set_xlim(x0 - pad, x1 + pad)
    ax.set_ylim(0, ymax * (1.36 if d.below_floor else 1.22) if ymax > 0 else 1.0)


def _annotate(ax, d: VramPlotData, ymax: float) -> None:
    xl, xr = ax.get_xlim()
    for i, p in enumerate(d.phases):  # names inside their bands, at the bottom where the curves rarely are
        if p.end_s - p.start_s >= 0.07 * (xr - xl):
            ax.text((p.start_s + p.end_s) / 2, 0.015, p.name, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=10, color=phase_color(p.name, i), fontweight="bold", alpha=0.9, zorder=1)
    if d.peak is not None:
        peak, t = d.peak
        right = (t - xl) < 0.6 * (xr - xl)  # the label goes on whichever side of the peak has room
        above = peak >= 0.8 * ymax  # above the star when it tops the plot, below when other lines run above
        ax.annotate(f"sampled peak {peak:,.0f} MiB\n@ t = {t:.1f} s", xy=(t, peak),
                    xytext=(28 if right else -28, 22 if above else -34), textcoords="offset points",
                    ha="left" if right else "right", va="bottom" if above else "top", multialignment="left",
                    fontsize=10, color=FAIL_COLOR if d.below_floor else "#1f3b73",
                    bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.7", alpha=0.9),
                    arrowprops=dict(arrowstyle="-", color="0.4", lw=0.8), zorder=7)
    if not d.sample_times:
        ax.text(0.5, 0.5, "no memory samples recorded", transform=ax.transAxes, ha="center", va="center",
                fontsize=13, color="0.4")
    if d.below_floor:
        figs = d.below_floor_figures
        detail = ", ".join(figs[:3]) + (", …" if len(figs) > 3 else "") if figs else "a measured peak"
        ax.text(0.01, 0.985, f"⚠ BELOW FLOOR: {detail} < weights+KV.\n"
                "A peak that should hold the model cannot be smaller than the floor:\n"
                "the measurement (or the claimed context) is wrong.", transform=ax.transAxes, ha="left", va="top",
                fontsize=9.5, color=FAIL_COLOR, bbox=dict(boxstyle="round,pad=0.4", fc="#fdecea", ec=FAIL_COLOR),
                zorder=8)


def _titles(fig, ax, d: VramPlotData) -> None:
    per = f"{d.period_s:g} s period" if d.period_s is not None else "period n/a"
    what = "Process memory (RSS)" if d.device_label == "process RSS" else "VRAM"
    s = "" if d.n_samples == 1 else "s"
    tp = f", tp={len(d.ranks)}" if d.ranks else ""  # the legend names each rank's line
    title = f"{what} — {d.device}   [{d.backend or '?'}, {per}, {d.n_samples} sample{s}{tp}]"
    if d.below_floor:
        fig.suptitle(title + "\n⚠ measured peak is BELOW the analytic weights+KV floor", fontsize=12.5,
                     color=FAIL_COLOR, fontweight="bold")
    else:
        fig.suptitle(title, fontsize=12.5)
    if d.fallback_reason:
        ax.set_title(f"fallback: {d.fallback_reason}", fontsize=9.5, color="0.35")


def draw_vram(d: VramPlotData, path: str | Path | None = None) -> Figure:
    """The VRAM figure: phases as bands, the sampled series, the weights+KV floor, the allocator peaks and the
    sampled peak. Also writes a PNG to ``path`` when given."""
    fig = Figure(figsize=(11, 6.2), layout="constrained")
    ax = fig.add_subplot()
    handles = _draw_phases(ax, d)  # first, so every line is drawn over the bands
    lines, all_y = _draw_lines(ax, d)
    handles += lines
    ymax = max(all_y) if all_y else 1.0
    _set_limits(ax, d, ymax)
    _annotate(ax, d, ymax)
    ax.yaxis.set_major_formatter(mb_formatter)
    ax.set_ylabel("RSS (MiB)" if d.device_label == "process RSS" else "memory (MiB)")
    ax.set_xlabel("time since sampling start (s)")
    ax.grid(True, axis="y", alpha=0.3)
    _titles(fig, ax, d)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=2 if len(handles) > 3 else len(handles),
                   fontsize=9, frameon=False)
    save(fig, path)
    return fig


def plot_vram(run_dir: str | Path, path: str | Path | None = None) -> Figure:
    """VRAM (or RSS) over time for ``run_dir``: :func:`draw_vram` of :func:`vram_series`."""
    return draw_vram(vram_series(run_dir), path)
