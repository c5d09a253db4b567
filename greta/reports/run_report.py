"""report.md of a probe run, rendered from the record's data (params, metadata, perf, metrics, vram summary,
verdict) through greta.reports.md: every value from outside is escaped, none is pasted into Markdown by hand.

    text = render_report(params_json, meta, perf, metrics, vram_summary, verdict)   # params.json's dict
"""
from __future__ import annotations

from greta.reports import fmt, md
from greta.reports.md import Markup
from greta.reports.memory_section import memory_name, memory_section, reproduce_lines, tp_bullet
from greta.reports.text_section import text_section

__all__ = ["render_report", "results_row", "results_columns", "interpret", "fault_report"]

PHASES = ("ceilings", "load", "prefill", "decode", "reference")


def results_columns(vram_summary) -> list[str]:
    """The seed report's columns; the peak named for what was sampled (RSS on the CPU), in MiB (2^20 bytes)."""
    return ["Context", "KV", f"Peak {memory_name(vram_summary)} (MiB)", "Max Logits Diff", "Top-1 Agreement", "Verdict"]


def results_row(params: dict, metrics, vram_summary, verdict) -> str:
    """The seed report's results row: context, KV, peak memory, max diff, top-1, verdict."""
    return md.row([params["ctx"], params["kv_aligned"], fmt.num(vram_summary.get("peak_vram_mb"), "{:.0f}"),
                   fmt.num(metrics and metrics["max_abs_diff"], "{:.6f}"),
                   fmt.num(metrics and metrics["top1_agreement"], "{:.4f}"), verdict["verdict"]])


def render_report(params: dict, meta, perf, metrics, vs, verdict) -> str:
    """report.md from the record's data: params is its params.json dict (a live run hands Params.to_dict())."""
    dev = meta.get("device_name") or params["device"]
    day = (meta.get("started_utc") or "")[:10]
    commit = (meta.get("commit") or "unknown")[:12] + (" (dirty)" if meta.get("dirty") else "")
    L = [md.heading(1, "B3.77 — Single-point ", params["ctx"], " long-context probe (", dev, ")"), "",
         md.line("Run", md.code(meta["run_id"]), "· started", meta.get("started_utc"), "· greta", commit, "· host",
                 meta.get("host")), "",
         # the verdict and the results first: a reader of a shared page sees them before anything else
         md.line("Verdict:", md.bold(verdict["verdict"]), "—", verdict["reason"]), "",
         md.heading(2, "Results (", dev, ", ", day, ")"), "",
         md.table(results_columns(vs), []), results_row(params, metrics, vs, verdict), ""]
    if metrics:
        L += _metrics_lines(metrics)
    L += text_section(meta)
    L += ["## Objective",
          md.text(f"Prefill a {params['ctx']}-token prompt through the batched prefill path, decode {params['gen']} "
                  f"tokens greedily through the one-token decode path, and compare the decode path's logits with the "
                  f"prefill path's (one teacher-forced batched pass) over the first {params['span']} generated "
                  "tokens."), ""]
    L += _matrix(params, meta)
    L += _timing(perf)
    L += memory_section(vs)
    L += ["## Interpretation", *md.bullets(interpret(params, perf, metrics, vs, verdict)), ""]
    L += reproduce_lines(params)
    L += ["## Provenance", *md.bullets([md.line("versions:", meta.get("versions")),
                                        md.line("platform:", meta.get("platform")),
                                        md.line("finished:", meta.get("finished_utc"))]), ""]
    return "\n".join(L)


def _matrix(params: dict, meta) -> list[str]:
    th = params["thresholds"]
    prompt = [md.line("Prompt: ", md.code(params["prompt"]),
                      " (uniform ids from torch's CPU generator seeded with the seed)"
                      if params["prompt"] == "synthetic" and not params.get("chat") else "", sep="")]
    for key in ("prompt_file", "tokenizer", "chat"):
        if params.get(key):
            prompt.append(md.line(key, md.code(params[key])))
    return ["## Matrix", *md.bullets([
        _model_line(params, meta),
        md.text(f"Context {params['ctx']} · generation {params['gen']} · span {params['span']} · dtype "
                f"{params['dtype']} · kv_aligned={params['kv_aligned']} · backend {params['backend']} · "
                f"prefill_chunk {params['prefill_chunk']} · kv_block {params['kv_block']}"),
        md.line(*prompt, sep=" · "),
        *tp_bullet(params),
        *_engine_bullet(meta.get("engine")),
        md.line("Negative control (perturb):", params["perturb"], "· fault injection:", params["fault"]),
        md.text(f"Stop conditions: OOM → FAIL_OOM at once; per-phase timeouts (s) {params['timeouts']}, enforced "
                f"by killing {'every rank' if params.get('tp', 1) > 1 else 'the worker process'} → FAIL_TIMEOUT"),
        md.text(f"Thresholds (kv_aligned=1): max_abs_diff ≤ {fmt.threshold(th['max_abs_diff'])}, p99_abs_diff ≤ "
                f"{fmt.threshold(th['p99_abs_diff'])}, top1_agreement ≥ {fmt.threshold(th['top1_agreement'])}")]), ""]


def _model_line(params: dict, meta) -> Markup:
    """The model, its source, size and hash; a run whose load phase never finished has none of them to state."""
    if not meta.get("model_hash"):
        return md.line("Model: ", md.code(params["model"]), f" (seed {params['seed']}) — not loaded: the load phase did "
                       "not finish, so its source, size and hash are not known", sep="")
    return md.line("Model: ", md.code(params["model"]), " (", meta.get("weights_source") or "?", " weights, seed ",
                   params["seed"], ", ", fmt.num(meta.get("param_count"), "{:,}"), " params), hash ",
                   md.code(meta.get("model_hash")), sep="")


def _engine_bullet(engine) -> list[Markup]:
    """A peer engine under audit (greta.engine.peers): its name, version, cache and attention; nothing for Greta."""
    if not isinstance(engine, dict) or engine.get("name") in (None, "greta"):
        return []
    return [md.line("Engine under audit: ", md.bold(engine.get("name")), " (", engine.get("version"), "; its own prefill "
                    "forward and its decode on its ", engine.get("cache"), ", attention ", engine.get("attention"), "; ",
                    engine.get("weights"), ")", sep="")]


def _metrics_lines(m) -> list[str]:
    return [*md.bullets([
        md.line("bit_exact:", md.bold(m["bit_exact"]), "· generated tokens agree:", m["tokens_agree"],
                "· p99 |Δ|", f"{m['p99_abs_diff']:.3g}", "· mean |Δ|", f"{m['mean_abs_diff']:.3g}",
                "· cosine min", fmt.num(m["cosine_min"], "{:.8f}"), "· first argmax mismatch:",
                m["first_argmax_mismatch"], "· distinct reference argmaxes over the span:",
                f"{m['distinct_argmax']}/{m['span']}"),
        "Step 0 is the last prompt position (prefill phase, chunked) against the reference pass; steps 1.. are "
        "decode steps."]), ""]


def _timing_row(ph, p, r) -> list:
    floor = ""
    if ph == "decode" and r:
        floor = f"{r['floor_ms_per_token']:.2f} ms/token (measured {r['ms_per_token']:.2f} ms/token)"
    elif r:
        floor = f"{r['floor_s']:.3g} s"
    return [ph, p.get("status"), fmt.num(p.get("wall_s"), "{:.2f}"), fmt.num(p.get("timeout_s"), "{:g}"), floor,
            f"{r['ratio']:.1f}×" if r else ""]


def _timing(perf) -> list[str]:
    rf = perf.get("roofline", {})
    rows = [_timing_row(ph, perf.get(ph, {}), rf.get(ph, {}) if ph in ("prefill", "decode", "reference") else {})
            for ph in PHASES]
    L = ["## Timing", "", md.table(["Phase", "Status", "Wall (s)", "Timeout (s)", "Roofline floor", "Wall / floor"],
                                   rows)]
    c = rf.get("ceilings")
    if c:
        L += ["", md.text(
            f"Ceilings measured in this run: {c['matmul_dtype']} matmul {c['matmul_tflops']:.1f} TFLOP/s "
            f"({c['matmul_n']}³ product), device copy {c['copy_gbps']:.0f} GB/s ({c['method']}). Prefill floor = "
            "FLOPs / matmul rate (linears 2·P·ctx + causal attention 2·L·H·D·ctx²); decode floor = bytes per "
            "token (weights but the embedding table, plus the KV cache at the mean position) / copy bandwidth.")]
        if rf.get("per_rank_of_tp"):
            L += ["", md.text(f"Tensor parallel (tp={rf['per_rank_of_tp']}): the floors are one rank's — 1/tp of the "
                              "FLOPs, one rank's weights and KV heads — against rank 0's ceilings; the reductions "
                              "between ranks are counted as free.")]
    L.append("")
    return L


def interpret(params: dict, perf, metrics, vs, verdict) -> list[Markup]:
    """The Interpretation bullets (Markup, values escaped)."""
    out = _interpret_metrics(params, metrics, verdict) if metrics else _interpret_fault(perf, verdict)
    if vs["below_floor"]:
        out.append(md.text(f"{memory_name(vs)}: a measured peak is below weights + KV cache, which is impossible for a correct "
                           "measurement."))
    elif vs.get("peak_vram_mb") is not None:
        out.append(md.line(f"{memory_name(vs)}: sampled peak {vs['peak_vram_mb']:.0f} MiB ≥ analytic floor "
                           f"{vs['floor']['total_mb']:.0f} MiB, headroom "
                           f"{vs['peak_vram_mb'] - vs['floor']['total_mb']:.0f} MiB (", vs["backend"], ").", sep=""))
    low = [str(x.get("rank")) for x in vs.get("ranks") or [] if x.get("below_floor")]
    if low:
        out.append(md.line(f"{memory_name(vs)}: rank(s)", ", ".join(low), "hold less than the per-rank weights + KV floor, which is "
                           "impossible for a correct measurement."))
    r = perf.get("roofline", {})
    if r.get("prefill"):
        out.append(md.text(f"Prefill took {r['prefill']['ratio']:.1f}× its roofline floor; decode "
                           f"{r['decode']['ratio']:.1f}× its bandwidth floor per token." if r.get("decode") else
                           f"Prefill took {r['prefill']['ratio']:.1f}× its roofline floor."))
        if params["kv_aligned"] and params["backend"] == "torch":
            out.append(md.text(f"The torch backend's aligned mode computes a whole {params['prefill_chunk']}-row "
                               "tile per decode step and attention in fp32: it is a reference for exactness, not "
                               "for speed."))
    return out


def _interpret_metrics(params: dict, metrics, verdict) -> list[Markup]:
    out = [md.bold(f"{verdict['verdict']} @ ctx={params['ctx']}; max diff={metrics['max_abs_diff']:.6g}; "
                   f"top1={metrics['top1_agreement']:.4f}; bit_exact={metrics['bit_exact']}")]
    if params["perturb"] != "none":
        out.append(md.line("NEGATIVE CONTROL: the decode path was deliberately broken (", params["perturb"],
                           "); this run shows what the check reports when the paths disagree.", sep=""))
    if params.get("engine", "greta") != "greta":
        out.append(_peer_sentence(params["engine"], metrics))
    elif params["kv_aligned"] and metrics["bit_exact"]:
        out.append(md.text("Decode reproduced the prefill path bit for bit. The paths run different code (a "
                           "one-token step reading the KV cache vs. a chunked batch), on the same tile shapes and "
                           "KV block order."))
    elif params["kv_aligned"]:
        out.append(md.text(f"Not bit-exact: the largest difference is {metrics['max_abs_diff']:.3g}; the verdict "
                           "applies the guardrail's tolerances."))
    else:
        out.append(md.text(f"kv_aligned=0: each path used its fastest ops; {metrics['max_abs_diff']:.3g} is the "
                           "measured cost of that in logits."))
    if metrics["distinct_argmax"] <= 1 and metrics["span"] > 1:
        out.append(md.text("Warning: the reference argmax is the same at every position; the comparison is "
                           "degenerate."))
    return out


def _peer_sentence(engine: str, metrics) -> Markup:
    """A peer engine is held to bit-exactness, the guarantee Greta's kv_aligned=1 gives (docs/ENGINES.md)."""
    if metrics["bit_exact"]:
        return md.line("engine=", engine, ": its decode reproduced its own prefill bit for bit at every compared "
                       "position.", sep="")
    return md.line("engine=", engine, f": its decode differs from its own prefill (largest {metrics['max_abs_diff']:.3g}); "
                   "a peer engine is held to bit-exactness, what Greta's kv_aligned=1 gives, so the verdict is "
                   "ENGINE_DRIFT: measured, not a failure of Greta's.", sep="")


def _interpret_fault(perf, verdict) -> list[Markup]:
    done = [ph for ph, p in perf.items() if isinstance(p, dict) and p.get("status") == "ok"]
    return [md.line(md.bold(verdict["verdict"]), " in phase ", verdict["failed_phase"], ": ", verdict["reason"], sep=""),
            md.line(f"Phases completed before the fault: {', '.join(done) or 'none'}.")]


def fault_report(verdict: str, reason: str, perf: dict, n_samples: int, peak_mb, floor_mb) -> str:
    """report.md of a run whose probe process died before writing its own (greta.reports.notebooks'
    fault record): the verdict, the reason, each phase's status and the VRAM figures up to the fault."""
    rows = [[ph, perf[ph].get("status"), fmt.num(perf[ph].get("wall_s"), "{}", none="")] for ph in perf]
    return "\n".join([md.heading(1, "B3.77 — ", verdict), "", md.line(reason, ".", sep=""), "",
                      md.table(["Phase", "Status", "Wall (s)"], rows), "",
                      md.line("Memory samples up to the fault: ", n_samples, " (peak ", fmt.mb(peak_mb), "; floor ",
                              fmt.mb(floor_mb), "). See run_b3_77.ipynb/.html here: cells after the fault did not "
                              "run.", sep=""), ""])


