"""Sections every probe kind's report.md shares: how memory was sampled (VRAM on a device, the process's RSS
on the CPU, in MiB = 2^20 bytes), the per-rank figures under tensor parallelism, and the command that runs
the same probe again."""
from __future__ import annotations

import shlex
from dataclasses import asdict

from greta.reports import fmt, md
from greta.reports.md import Markup


def memory_name(vs) -> str:
    """What the sampled peak is: "RSS" (the process's resident memory, a CPU run) or "VRAM" (a device's)."""
    return "RSS" if (vs or {}).get("backend") == "rss" else "VRAM"


def memory_section(vs) -> list[str]:
    """The sampling method, the allocator peaks and the analytic floor (and each rank's figures under tp)."""
    fl, name = vs["floor"], memory_name(vs)
    fallback = md.line(" (fallback: ", vs["fallback_reason"], ")", sep="") if vs.get("fallback_reason") else ""
    what = "process RSS: a CPU run" if name == "RSS" else "device memory"
    L = [md.heading(2, "Memory sampling method (", what, ")"), *md.bullets([
        md.line("Backend: ", md.bold(vs["backend"]), fallback, sep=""),
        md.line("Device info:", vs["device_info"]),
        md.line("Sampling period:", vs["sampling_period_sec"], "s · samples:", vs["samples_count"], f"· peak {name}:",
                fmt.num(vs["peak_vram_mb"], "{:.0f}"), "MiB at t =", fmt.num(vs["peak_timestamp_offset_sec"], "{:.1f}"),
                "s from the start of sampling"),
        "Note: sampled figures can miss micro-spikes between samples; the allocator peaks below are exact."]), ""]
    peaks = [[ph, fmt.num(a.get("max_allocated_mb"), "{:.0f}"), fmt.num(a.get("max_reserved_mb"), "{:.0f}")]
             for ph, a in vs.get("allocator_peaks", {}).items()] or [["—", "no device allocator (CPU run)", ""]]
    L.append(md.table(["Phase", "Allocator max allocated (MiB)", "Allocator max reserved (MiB)"], peaks))
    below = (md.line(md.bold("Below the floor — these figures cannot be right:"),
                     md.line(*vs["below_floor_figures"], sep="; ")) if vs["below_floor"]
             else "Every measured peak is at or above it.")
    per_rank = f" per rank (tp={fl['tp']})" if fl.get("tp") else ""
    floor = md.line(f"Analytic floor{per_rank}: weights", fmt.num(fl["weights_mb"], "{:.0f}"), "MiB + KV cache",
                    fmt.num(fl["kv_cache_mb"], "{:.0f}"), "MiB =", md.bold(fmt.num(fl["total_mb"], "{:.0f} MiB")))
    L += ["", md.line(floor, ". ", below, sep=""), ""]
    if vs.get("ranks"):
        L += _rank_table(vs)
    return L


def _rank_table(vs) -> list[str]:
    """Tensor parallel: each rank's sampled peak and allocator peak against the per-rank floor (the figures
    above are rank 0's)."""
    rows = []
    for r in vs["ranks"]:
        allocated = [a.get("max_allocated_mb") for a in (r.get("allocator_peaks") or {}).values()]
        allocated = [a for a in allocated if a is not None]
        rows.append([r.get("rank"), r.get("backend"), r.get("device_info"), fmt.num(r.get("peak_vram_mb"), "{:.0f}"),
                     fmt.num(max(allocated) if allocated else None, "{:.0f}"),
                     "below the floor" if r.get("below_floor") else ("yes" if r.get("floor_applies") else "not held")])
    how = ("Each rank's process RSS, sampled on its own (a CPU run)" if memory_name(vs) == "RSS" else
           f"Each rank sampled on its own device ({vs.get('backend')})")
    return ["### Per rank", "", md.text(f"{how}; the figures above are rank 0's."), "",
            md.table(["Rank", "Backend", "Device", f"Peak {memory_name(vs)} (MiB)", "Allocator max allocated (MiB)",
                      "At or above the per-rank floor"], rows), ""]


def reproduce_command(params: dict) -> str:
    """`python -m greta audit` with every param that differs from its default (sections dotted), each value
    shell-quoted: run anywhere in a checkout, it runs this probe again."""
    from greta.record.params import Params

    defaults = _flat(asdict(Params()))
    given = _flat(params)
    over = [shlex.quote(f"{k}={v}") for k, v in given.items() if k in defaults and v != defaults[k]]
    return " ".join(["python -m greta audit"] + [f"-p {o}" for o in over])


def _flat(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out.update({f"{k}.{sk}": sv for sk, sv in v.items()} if isinstance(v, dict) else {k: v})
    return out


def reproduce_lines(params: dict) -> list[Markup | str]:
    return ["## Reproduce", "", md.line("Command:", md.code(reproduce_command(params))), "",
            "Every param that differs from its default is given; params.json in this directory holds every value used.",
            ""]


def tp_bullet(params: dict) -> list[Markup]:
    """Tensor parallel runs, of any probe kind: the degree and how it ran (nothing for tp=1, whose report is as it was)."""
    tp = params.get("tp", 1)
    if tp == 1:
        return []
    return [md.line("Tensor parallel: ", md.bold(f"tp={tp}"), f" — one worker process per rank (rank r on "
                    f"{'cuda:r' if params['device'] == 'cuda' else params['device']}), each holding its shard of the "
                    "weights and of the KV heads; rank 0's logits are recorded, every rank's logits checked equal "
                    "(sha256)", sep="")]
