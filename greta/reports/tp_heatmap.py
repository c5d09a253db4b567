"""The tp-invariance probe's heat map: degree x position, max |Δlogit| against the first degree (tp=1), over
the prefill positions then the decode ones. :func:`heatmap_data` reads a record's metrics.json and
verdict.json into a :class:`HeatmapData` (tested on its own), :func:`draw_heatmap` draws it;
:func:`plot_heatmap` does both. A cell that is bit-identical (|Δ| = 0, which a log scale cannot show) is drawn
in its own colour, named in the legend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from greta.record.tp_invariance import heatmap
from greta.reports.plot_style import FAIL_COLOR, save
from greta.reports.run_files import read_obj_opt

__all__ = ["HeatmapData", "heatmap_data", "draw_heatmap", "plot_heatmap"]

ZERO_COLOR = "#c8e6c9"  # bit-identical
PASS_COLOR = "#2e7d32"


@dataclass
class HeatmapData:
    verdict: str            # "NO VERDICT" without verdict.json
    reference_tp: int | None
    degrees: list[int]      # the rows: each degree compared with reference_tp
    positions: list[int]    # the columns: absolute positions, prefill's then decode's
    ctx: int                # the first decode position
    grid: np.ndarray        # [degrees, positions] max |Δ|; empty without metrics

    @property
    def zero_cells(self) -> int:
        return int((self.grid == 0).sum())

    def alt_text(self) -> str:
        if not self.grid.size:
            return f"No heat map: the record has no comparison ({self.verdict})."
        worst = float(self.grid.max())
        return (f"Heat map of max |Δlogit| against tp={self.reference_tp} for tp {', '.join(map(str, self.degrees))} "
                f"over {len(self.positions)} positions: {self.zero_cells} of {self.grid.size} cells bit-identical, "
                f"largest |Δ| {worst:.3g}; verdict {self.verdict}.")


def heatmap_data(run_dir: str | Path) -> HeatmapData:
    run_dir = Path(run_dir)
    metrics = read_obj_opt(run_dir / "metrics.json") or {}
    verdict = (read_obj_opt(run_dir / "verdict.json") or {}).get("verdict") or "NO VERDICT"
    if not metrics.get("across"):
        return HeatmapData(verdict, None, [], [], int(metrics.get("ctx") or 0), np.zeros((0, 0)))
    degrees, positions, grid = heatmap(metrics)
    return HeatmapData(verdict, metrics["reference_tp"], degrees, positions, metrics["ctx"], grid)


def draw_heatmap(d: HeatmapData) -> Figure:
    fig = Figure(figsize=(8.0, 1.4 + 0.45 * max(1, len(d.degrees))))
    ax = fig.add_subplot()
    color = PASS_COLOR if d.verdict.startswith("PASS") else FAIL_COLOR
    ax.set_title(f"{d.verdict} — max |Δlogit| against tp={d.reference_tp}, per position", color=color, fontsize=10)
    if not d.grid.size:
        ax.text(0.5, 0.5, "no comparison in this record", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    ax.imshow(np.ones((*d.grid.shape, 3)) * np.array([int(ZERO_COLOR[i:i + 2], 16) / 255 for i in (1, 3, 5)]),
              aspect="auto", interpolation="nearest")
    positive = np.ma.masked_less_equal(d.grid, 0)
    handles = [Patch(color=ZERO_COLOR, label="0 (bit-identical)")]
    if positive.count():
        lo, hi = float(positive.min()), float(positive.max())
        norm = LogNorm(vmin=10 ** math.floor(math.log10(lo)), vmax=max(hi, 10 ** math.floor(math.log10(lo)) * 10))
        im = ax.imshow(positive, aspect="auto", interpolation="nearest", cmap="magma_r", norm=norm)
        fig.colorbar(im, ax=ax, label="max |Δlogit|", pad=0.01)
    ax.set_yticks(range(len(d.degrees)), [f"tp={t}" for t in d.degrees])
    n_pre = d.positions.index(d.ctx) if d.ctx in d.positions else len(d.positions)
    ax.axvline(n_pre - 0.5, color="0.2", lw=1.2, ls="--")
    ax.set_xlabel(f"position (prefill 0..{n_pre - 1} | decode {d.ctx}..)")
    step = max(1, len(d.positions) // 8)
    ticks = sorted({t for t in range(0, n_pre, step) if n_pre - t > step // 2} | {n_pre, len(d.positions) - 1} - {len(d.positions)})
    ax.set_xticks(ticks, [str(d.positions[i]) for i in ticks])
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.35), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_heatmap(run_dir: str | Path, png: str | Path | None) -> HeatmapData:
    """Draw the record's heat map to png; returns its data (alt text: data.alt_text())."""
    d = heatmap_data(run_dir)
    save(draw_heatmap(d), png, dpi=100)
    return d
