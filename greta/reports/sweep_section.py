"""A part of a sweep report: a heading, what it shows, a table and figures (a probe kind's sweep_sections
returns a list of them; notebooks/sweep_report.ipynb shows each in turn)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Section:
    title: str
    intro: str                          # Markdown: what the section shows and how to read it
    table: str = ""                     # Markdown (through greta.reports.md)
    figures: tuple[Path, ...] = ()      # PNGs already drawn
    after: str = ""                     # Markdown shown below the figures


def memory_label(rows: list[dict]) -> str:
    """What the sampled peak is on these points: process RSS on the CPU, the device's used memory elsewhere."""
    backend = next((r.get("vram_backend") for r in rows if r.get("vram_backend")), None)
    return "process RSS (CPU run)" if backend == "rss" else f"device memory ({backend or 'sampler unknown'})"
