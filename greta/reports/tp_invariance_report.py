"""report.md of a tp-invariance probe run (greta/record/tp_invariance.py), rendered from the record's data
through greta.reports.md. It states what greta verify holds against the data files (greta.checks.statements):
the verdict, the results table (Max Logits Diff: the worst degree's), perturb, bit_exact and max_abs_diff.

    text = render_tp_report(params_json, meta, perf, metrics, vram_summary, verdict)   # params.json's dict
"""
from __future__ import annotations

from greta.reports import fmt, md
from greta.reports.memory_section import memory_section, reproduce_lines
from greta.record.tp_invariance import PATHS

COLUMNS = ["Degrees", "Context", "KV", "Tree S", "Max Logits Diff", "First difference", "Verdict"]
DEGREE_COLUMNS = ["tp", "vs tp", "prefill max |Δ|", "prefill first diff", "decode max |Δ|", "decode first diff",
                  "reference max |Δ|", "reference first diff", "Bit-exact"]
PHASES = ("ceilings", "load", "prefill", "decode", "reference")


def _first(f) -> str:
    return "none" if not f else f"tp={f['tp']} {f['path']} at position {f['position']}"


def _summary_row(params: dict, meta, metrics, verdict) -> list:
    degrees = ", ".join(map(str, metrics["degrees"])) if metrics else "—"
    return [degrees, params["ctx"], params["kv_aligned"], meta.get("tree_segments") or "off",
            fmt.num(metrics and metrics["max_abs_diff"], "{:.6g}"),
            _first(metrics["first_difference"]) if metrics else "—", verdict["verdict"]]


def render_tp_report(params: dict, meta, perf, metrics, vs, verdict) -> str:
    """report.md from the record's data: params is its params.json dict (a live run hands Params.to_dict())."""
    dev = meta.get("device_name") or params["device"]
    commit = (meta.get("commit") or "unknown")[:12] + (" (dirty)" if meta.get("dirty") else "")
    L = [md.heading(1, "TP invariance — tp 1..", params["tp"], " at ctx ", params["ctx"], " (", dev, ")"), "",
         md.line("Run", md.code(meta["run_id"]), "· started", meta.get("started_utc"), "· greta", commit), "",
         md.line("Verdict:", md.bold(verdict["verdict"]), "—", verdict["reason"]), "",
         "## Results", "", md.table(COLUMNS, [_summary_row(params, meta, metrics, verdict)]), ""]
    if metrics:
        L += _figures(metrics)
    L += _matrix(params, meta)
    L += _timing(perf)
    L += memory_section(vs)
    L += reproduce_lines(params)
    return "\n".join(L)


def _figures(m) -> list[str]:
    ref = m["reference_tp"]
    rows = [[r["tp"], ref, *[c for p in PATHS for c in (fmt.num(r[p]["max_abs_diff"], "{:.6g}"),
                                                         r[p]["first_diff_pos"] if r[p]["first_diff_pos"] is not None
                                                         else "none")], r["bit_exact"]] for r in m["across"]]
    within = [[r["tp"], fmt.num(r["max_abs_diff"], "{:.6g}"), r["first_diff_pos"] if r["first_diff_pos"] is not None
               else "none", r["bit_exact"]] for r in m["within"]]
    ds = m["degrees"]
    pair = {(a, b): v for a, b, v in m["pairs"]}
    grid = [[a, *[("0" if a == b else fmt.num(pair.get((min(a, b), max(a, b))), "{:.3g}")) for b in ds]] for a in ds]
    return [*md.bullets([md.line("bit_exact:", md.bold(m["bit_exact"]), "· max_abs_diff=" + f"{m['max_abs_diff']:.6g}",
                                 "· finite:", m["finite"])]), "",
            "## Across degrees", "",
            md.text(f"Every degree's logits against tp={ref}'s, bit for bit: prefill positions 0..{m['ctx'] - 1}, "
                    f"decode and its reference positions {m['ctx']}..{m['ctx'] + m['span'] - 2}."), "",
            md.table(DEGREE_COLUMNS, rows), "",
            "### Degree × degree max |Δ| (every path and position)", "",
            md.table(["tp", *[f"tp={d}" for d in ds]], grid), "",
            "## Within each degree: decode against its teacher-forced prefill", "",
            md.table(["tp", "max |Δ|", "first diff", "Bit-exact"], within), ""]


def _matrix(params: dict, meta) -> list[str]:
    seg = meta.get("tree_segments")
    return ["## Matrix", *md.bullets([
        md.line("Model:", md.code(params["model"]), "· hash", md.code(meta.get("model_hash"))),
        md.text(f"Degrees 1..{params['tp']} (each on ranks 0..d-1 of one group) · context {params['ctx']} · "
                f"generation {params['gen']} · span {params['span']} · dtype {params['dtype']} · kv_aligned="
                f"{params['kv_aligned']} · backend {params['backend']} · prefill_chunk {params['prefill_chunk']} · "
                f"kv_block {params['kv_block']}"),
        md.text(f"Row-parallel order: the segment tree of S={seg} segments, fp32 partials, rounded once" if seg else
                "Row-parallel order: each rank's own K loop, partials added by rank (no tree)"),
        md.line("Negative control (perturb):", params["perturb"], "· fault injection:", params["fault"]),
        md.text("Judgement (kv_aligned=1): every logit bit-identical to the first degree's, and decode equal to its "
                "prefill within each degree, else FAIL_TP_INVARIANT; kv_aligned=0: the differences are measured "
                "(TP_DRIFT). No tolerance applies.")]), ""]


def _timing(perf) -> list[str]:
    rows = [[ph, (perf.get(ph) or {}).get("status"), fmt.num((perf.get(ph) or {}).get("wall_s"), "{:.2f}"),
             fmt.num((perf.get(ph) or {}).get("timeout_s"), "{:g}")] for ph in PHASES]
    return ["## Timing", "", md.text("Each phase runs every degree in turn; the times are rank 0's."), "",
            md.table(["Phase", "Status", "Wall (s)", "Timeout (s)"], rows), ""]
