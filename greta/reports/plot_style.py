"""What every figure shares: colors, the log-axis floor that stands for 0, saving.

Figures are built with :class:`matplotlib.figure.Figure` directly, not pyplot: no GUI backend is touched,
nothing accumulates in pyplot's figure registry, and it works the same under Agg, in a Jupyter kernel and in a
headless test.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

__all__ = ["PHASE_COLORS", "VERDICT_COLORS", "FAIL_COLOR", "phase_color", "log_floor", "on_log_axis", "save",
           "mb_formatter"]

PHASE_COLORS = {"load": "#9e9e9e", "prefill": "#4c78a8", "decode": "#f58518", "reference": "#54a24b"}
_EXTRA_COLORS = ["#b279a2", "#72b7b2", "#eeca3b", "#ff9da6", "#9d755d"]
VERDICT_COLORS = {"PASS_EQUIV": "#2e7d32", "EXPECTED_DRIFT": "#ef6c00", "ENGINE_DRIFT": "#ef6c00"}
FAIL_COLOR = "#c62828"

mb_formatter = FuncFormatter(lambda v, _pos: f"{v:,.0f}")


def phase_color(name: str, i: int) -> str:
    return PHASE_COLORS.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def log_floor(values: list[float], thresholds: list[float]) -> float:
    """A value a decade below every positive datum and threshold: where 0 is drawn on a log axis."""
    pos = [v for v in list(values) + list(thresholds) if v is not None and v > 0]
    lo = min(pos) if pos else 1e-3
    return 10 ** (math.floor(math.log10(lo)) - 1)


def on_log_axis(v: float, zero: float) -> float:
    """Where ``v`` is drawn on a log axis whose 0 is drawn at ``zero`` (a threshold of 0 sits on that line)."""
    return zero if v <= 0 else v


def save(fig: Figure, path: str | Path | None, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG of at most 256 colours. A record holds each figure three times (the file, the
    executed notebook, the HTML page) and records are committed: a plot of a few flat colours loses nothing
    visible in a palette, and the file shrinks to about a third."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_palette(fig, path, dpi)


def _save_palette(fig: Figure, path: Path, dpi: int) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as im:
        pal = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    pal.save(path, format="PNG", optimize=True)
