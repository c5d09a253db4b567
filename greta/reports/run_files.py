"""Reading the files of one run directory (layout: docs/RECORD.md) for the plots and tables, never raising for a
run that failed part-way: a missing or unreadable file reads as None."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from greta.reports.fmt import finite

__all__ = ["read_json", "read_obj_opt", "read_vram_samples", "thresholds", "DEFAULT_THRESHOLDS"]

# Verdict thresholds used when params.json does not carry them (seed policy).
DEFAULT_THRESHOLDS = {"max_abs_diff": 5e-3, "p99_abs_diff": 1e-3}


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_obj_opt(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when missing, unreadable or not an object."""
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_vram_samples(run_dir: str | Path) -> list[dict]:
    """Rows of ``vram_samples.csv`` with numbers parsed; empty cells become None."""
    rows = []
    with open(Path(run_dir) / "vram_samples.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append({"t_s": finite(r.get("t_s")), "phase": (r.get("phase") or "").strip(),
                         "device_used_mb": finite(r.get("device_used_mb")),
                         "allocated_mb": finite(r.get("allocated_mb")), "reserved_mb": finite(r.get("reserved_mb"))})
    return [r for r in rows if r["t_s"] is not None]


def thresholds(run_dir: str | Path) -> dict:
    """The run's max_abs_diff / p99_abs_diff thresholds from params.json, else the defaults. Any finite value
    >= 0 stands as given: a threshold of 0 (bit-exactness demanded) is 0, not the default."""
    th = dict(DEFAULT_THRESHOLDS)
    params = read_obj_opt(Path(run_dir) / "params.json") or {}
    given = params.get("thresholds")
    if isinstance(given, dict):
        for k in th:
            v = finite(given.get(k))
            if v is not None and v >= 0:
                th[k] = v
    return th
