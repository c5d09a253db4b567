"""Numbers and table cells, formatted in one place for every report (report.md, the notebooks' tables, the
sweep, oracle, legacy and analyzer reports). Plain strings: the Markdown renderers escape them (greta.reports.md)."""
from __future__ import annotations

import math
from typing import Any

from greta.reports import md

__all__ = ["NONE", "num", "finite", "mb", "diff", "threshold", "near_one", "cell", "DIFF_KEYS"]

NONE = "—"  # a missing figure in a table
DIFF_KEYS = ("max_abs_diff", "p99_abs_diff", "mean_abs_diff")  # |Δ| columns: an exact 0 means bit-exact


def num(x: Any, spec: str = "{:.3f}", none: str = NONE) -> str:
    """``x`` through ``spec`` (a str.format pattern), or ``none`` when x is None."""
    return none if x is None else spec.format(x)


def finite(x: Any) -> float | None:
    """A finite float, or None for missing / empty / null / non-numeric / non-finite."""
    if x is None or x == "" or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f} MiB"  # 2**20 bytes, as every *_mb figure of a record


def diff(x: float | None) -> str:
    """A |Δlogit|: "0 (bit-exact)" for an exact zero, three significant digits otherwise."""
    if x is None:
        return "n/a"
    return "0 (bit-exact)" if x == 0 else f"{x:.3g}"


def threshold(x: float) -> str:
    """A threshold as it was given (0 stays 0: a threshold of 0 demands bit-exactness)."""
    return f"{x:g}"


def near_one(x: float) -> str:
    # Cosines and agreement rates live just under 1: show the digits that matter.
    return f"{x:.9f}" if 0 < abs(1 - x) < 1e-3 else f"{x:.4g}"


def cell(v: Any, col: str = "") -> str | md.Markup:
    """A generic table cell: None "—", booleans ✓ / **✗**, an exact 0 in a |Δ| column "0 (bit-exact)"."""
    if v is None:
        return NONE
    if isinstance(v, md.Markup):
        return v
    if isinstance(v, bool):
        return "✓" if v else md.bold("✗")
    if isinstance(v, float):
        return "0 (bit-exact)" if v == 0 and col in DIFF_KEYS else near_one(v)
    return str(v)
