"""report.md of a batch probe run (greta/record/batch.py), rendered from the record's data through
greta.reports.md. It states what greta verify holds against the data files (greta.checks.statements): the
verdict, the results table (its first row: the worst request), the thresholds, perturb, bit_exact and
max_abs_diff.

    text = render_batch_report(params_json, meta, perf, metrics, vram_summary, verdict)   # params.json's dict
"""
from __future__ import annotations

from greta.reports import fmt, md
from greta.reports.memory_section import memory_section, reproduce_lines, tp_bullet

COLUMNS = ["Batch", "Context", "KV", "Worst request", "Max Logits Diff", "Decode tok/s", "Floor tok/s", "Verdict"]
REQUEST_COLUMNS = ["Request", "Prompt tokens", "Decode steps", "Rows compared", "|a − b| max", "|b − c| max",
                   "Top-1 (b vs c)", "Bit-exact"]
PHASES = ("ceilings", "load", "prefill", "decode", "reference")


def _summary_row(params: dict, metrics, perf, verdict) -> list:
    full = (perf.get("roofline") or {}).get("full_batch") or {}
    return [params["batch"], params["ctx"], params["kv_aligned"], metrics["worst_request"] if metrics else "—",
            fmt.num(metrics and metrics["max_abs_diff"], "{:.6f}"), fmt.num(full.get("tokens_per_s"), "{:.1f}"),
            fmt.num(full.get("floor_tokens_per_s"), "{:.1f}"), verdict["verdict"]]


def render_batch_report(params: dict, meta, perf, metrics, vs, verdict) -> str:
    """report.md from the record's data: params is its params.json dict (a live run hands Params.to_dict())."""
    dev = meta.get("device_name") or params["device"]
    commit = (meta.get("commit") or "unknown")[:12] + (" (dirty)" if meta.get("dirty") else "")
    L = [md.heading(1, "Batch probe — ", params["batch"], " requests at ctx ", params["ctx"], " (", dev, ")"), "",
         md.line("Run", md.code(meta["run_id"]), "· started", meta.get("started_utc"), "· greta", commit), "",
         md.line("Verdict:", md.bold(verdict["verdict"]), "—", verdict["reason"]), "",
         "## Results", "", md.table(COLUMNS, [_summary_row(params, metrics, perf, verdict)]), ""]
    if metrics:
        L += [*md.bullets([md.line("bit_exact:", md.bold(metrics["bit_exact"]), "· max_abs_diff=" +
                                   f"{metrics['max_abs_diff']:.6g}", "· worst request:", metrics["worst_request"],
                                   "· requests not bit-exact:", len(metrics["inexact_requests"]))]), "",
              "## Per request", "",
              "(a) decoded alone (a batch of one), (b) in the batch, (c) the teacher-forced prefill reference, all on "
              "the batch's tokens; row 0 is the prompt's last position, then one row per compared decode step.", "",
              md.table(REQUEST_COLUMNS, [_request_row(r) for r in metrics["per_request"]]), ""]
    L += _matrix(params, meta)
    L += _throughput(perf)
    L += memory_section(vs)
    L += reproduce_lines(params)
    return "\n".join(L)


def _request_row(r) -> list:
    return [r["request"], r["prompt_tokens"], r["decode_steps"], r["compared_rows"],
            fmt.num(r["alone_vs_batch_max_abs_diff"], "{:.6g}"), fmt.num(r["batch_vs_reference_max_abs_diff"], "{:.6g}"),
            fmt.num(r["top1_agreement"], "{:.4f}"), r["bit_exact"]]


def _matrix(params: dict, meta) -> list[str]:
    lengths = (meta.get("batch") or {}).get("lengths")
    return ["## Matrix", *md.bullets([
        md.line("Model:", md.code(params["model"]), "· hash", md.code(meta.get("model_hash"))),
        md.text(f"Batch {params['batch']} · context {params['ctx']} · generation {params['gen']} · span "
                f"{params['span']} · dtype {params['dtype']} · kv_aligned={params['kv_aligned']} · backend "
                f"{params['backend']} · prefill_chunk {params['prefill_chunk']} · kv_block {params['kv_block']}"),
        md.line("Prompt lengths:", lengths if lengths is not None else "—", "(given)" if params["batch_lengths"]
                else "(drawn with the seed, uniform in [ctx/2, ctx])"),
        md.line("Negative control (perturb):", params["perturb"], "· fault injection:", params["fault"]),
        *tp_bullet(params),
        md.text("Judgement (kv_aligned=1): (a), (b) and (c) bit-identical for every request, else "
                "FAIL_BATCH_INVARIANT; kv_aligned=0: the differences are measured (BATCH_DRIFT). No tolerance "
                "applies.")]), ""]


def _throughput(perf) -> list[str]:
    rf = perf.get("roofline") or {}
    rows = [[ph, (perf.get(ph) or {}).get("status"), fmt.num((perf.get(ph) or {}).get("wall_s"), "{:.2f}"),
             fmt.num((perf.get(ph) or {}).get("timeout_s"), "{:g}")] for ph in PHASES]
    L = ["## Timing and throughput", "", md.table(["Phase", "Status", "Wall (s)", "Timeout (s)"], rows), ""]
    figs = []
    if rf.get("prefill_tokens_per_s"):
        figs.append(md.text(f"Prefill: {rf['prefill_tokens']} tokens at {rf['prefill_tokens_per_s']:.1f} tokens/s "
                            "(sequence by sequence)"))
    for name, what in (("full_batch", "whole batch live"), ("all_steps", "all steps")):
        f = rf.get(name)
        if f:
            floor = (f", floor {f['floor_ms_per_step']:.3f} ms/step = {f['floor_tokens_per_s']:.1f} tokens/s, "
                     f"floor/measured {f['ratio_of_floor']:.2f}") if "floor_ms_per_step" in f else ""
            figs.append(md.text(f"Decode ({what}, {f['steps']} steps): median {f['ms_per_step_median']:.3f} ms/step, "
                                f"{f['tokens_per_s']:.1f} tokens/s{floor}"))
    figs.append("Floor per step: every weight once (the embedding table is gathered, not read) plus each live "
                "sequence's KV up to its position, over the copy bandwidth measured in this run.")
    return L + md.bullets(figs) + [""]
