"""The VRAM samples of a record: vram_samples.csv, the vram.json summary of them, and the analytic
weights + KV floor that every measured peak must reach (docs/RECORD.md). The sampler that takes the
samples is greta.probe.vram; this module only holds and judges the numbers. MB = 2**20 bytes."""
from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

from greta.record.files import atomic_write_text

if TYPE_CHECKING:  # the annotation only: greta.record.params is imported where a floor is computed
    from greta.record.params import Params

MB = 2**20
CSV_COLUMNS = ["t_s", "phase", "device_used_mb", "allocated_mb", "reserved_mb"]


def _fmt(x, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def write_samples_csv(path, samples: list[dict]):
    """Written atomically, so the CSV is whole or absent."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for s in samples:
        w.writerow([_fmt(s["t_s"], 3), s["phase"] or "", _fmt(s["device_used_mb"], 1),
                    _fmt(s["allocated_mb"], 1), _fmt(s["reserved_mb"], 1)])
    atomic_write_text(path, buf.getvalue())


RANK_SAMPLES_CSV = "vram_samples_ranks.csv"  # tp > 1: every rank's samples, a rank column first


def write_rank_samples_csv(path, samples_by_rank: list[list[dict]]):
    """Every rank's samples in one CSV (rank, then vram_samples.csv's columns), written atomically."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["rank", *CSV_COLUMNS])
    for r, samples in enumerate(samples_by_rank):
        for s in samples:
            w.writerow([r, _fmt(s["t_s"], 3), s["phase"] or "", _fmt(s["device_used_mb"], 1),
                        _fmt(s["allocated_mb"], 1), _fmt(s["reserved_mb"], 1)])
    atomic_write_text(path, buf.getvalue())


def read_rank_samples_csv(path) -> dict[int, list[dict]]:
    """vram_samples_ranks.csv as {rank: rows as read_samples_csv gives them}."""
    out: dict[int, list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            d = {k: (float(row[k]) if row[k] != "" else None) for k in CSV_COLUMNS if k != "phase"}
            d["phase"] = row["phase"] or None
            out.setdefault(int(row["rank"]), []).append({k: d[k] for k in CSV_COLUMNS})
    return out


def read_samples_csv(path) -> list[dict]:
    """Rows of vram_samples.csv as dicts of floats (phase: str); empty cells become None."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            d = {k: (float(row[k]) if row[k] != "" else None) for k in CSV_COLUMNS if k != "phase"}
            d["phase"] = row["phase"] or None
            out.append({k: d[k] for k in CSV_COLUMNS})
    return out


def _round(x, digits: int):
    return None if x is None else round(x, digits)


def _below_floor(peak_mb, allocator_peaks: dict, total, loaded: bool) -> list[str]:
    """The figures that must contain weights + KV cache but are smaller. RSS on the CPU holds them too, so
    it is compared as well; "ceilings" and "load" are skipped: the model and cache don't exist (yet) then."""
    figures = []
    if loaded and total is not None and peak_mb is not None and peak_mb < total:
        figures.append(f"peak_vram_mb {peak_mb:.1f} < floor {total:.1f}")
    for phase, p in allocator_peaks.items():
        a = p.get("max_allocated_mb")
        if phase not in ("ceilings", "load") and total is not None and a is not None and a < total:
            figures.append(f"{phase} max_allocated_mb {a:.1f} < floor {total:.1f}")
    return figures


def summary(samples: list[dict], allocator_peaks: dict, floor: dict, *, loaded: bool, backend=None,
            fallback_reason=None, device_info=None, period_s=None, phases=()) -> dict:
    """The vram.json dict (docs/RECORD.md). allocator_peaks: {phase: {"max_allocated_mb", "max_reserved_mb"}},
    values None where there is no allocator (CPU); floor: floor_mb(...). loaded: the load phase finished, so
    weights + KV cache were held (a run that failed before, e.g. an OOM allocating the cache, never held them
    and its peak is not held against the floor)."""
    measured = [s for s in samples if s["device_used_mb"] is not None]
    peak = max(measured, key=lambda s: s["device_used_mb"]) if measured else None  # first of equal peaks
    peak_mb = _round(peak and peak["device_used_mb"], 1)
    figures = _below_floor(peak_mb, allocator_peaks, floor["total_mb"], loaded)
    return {  # the file's data; Record.write_json adds vram.json's format (greta.record.files.VramSummary)
        "backend": backend,
        "fallback_reason": fallback_reason,
        "device_info": device_info,
        "sampling_period_sec": period_s,
        "samples_count": len(samples),
        "peak_vram_mb": peak_mb,
        "peak_timestamp_offset_sec": _round(peak and peak["t_s"], 3),
        "allocator_peaks": allocator_peaks,
        "floor": floor,
        "floor_applies": loaded,
        "below_floor": bool(figures),
        "below_floor_figures": figures,
        "phases": [{"name": p["name"], "start_s": _round(p["start_s"], 3), "end_s": _round(p["end_s"], 3)}
                   for p in phases],
    }


def floor_mb(cfg, dtype_bytes: int, cache_tokens: int, tp: int = 1) -> dict:
    """Least memory the run must hold (per rank under tensor parallelism tp): its weights (embedding and norms
    replicated, the rest split tp ways) plus its KV heads' cache of cache_tokens positions."""
    weights = cfg.rank_param_count(tp) * dtype_bytes / MB
    kv = cfg.kv_bytes_per_token(dtype_bytes) * cache_tokens / tp / MB
    out = {"weights_mb": round(weights, 1), "kv_cache_mb": round(kv, 1), "total_mb": round(weights + kv, 1)}
    if tp > 1:
        out.update(tp=tp, allreduce_bytes_per_token=cfg.allreduce_bytes_per_token(tp, dtype_bytes))
    return out


def floor_for(params: Params, cfg) -> dict:
    """floor_mb for a probe run: the model cfg in params.dtype, with a cache of ctx + gen positions (the batch
    probe: one such slab per request, all preallocated; every other kind holds batch at 1), per rank of
    params.tp."""
    from greta.record.params import dtype_bytes

    return floor_mb(cfg, dtype_bytes(params.dtype), (params.ctx + params.gen) * params.batch, params.tp)
