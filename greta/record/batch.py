"""The batch probe as data (no torch): which requests it runs, how their logits compare, its verdict and its
throughput against the roofline floor.

Per request b the probe holds three sets of logits over the same positions (the prefill's last position,
then each compared decode step, all on the tokens the batch generated):
  (a) alone      decoded in a batch of one,
  (b) in batch   decoded with every other request of the batch,
  (c) reference  the teacher-forced prefill of prompt + generated tokens.
kv_aligned=1: (a), (b) and (c) must be bit-identical for every request (PASS_BATCH_INVARIANT, else
FAIL_BATCH_INVARIANT); kv_aligned=0: the differences are measured (BATCH_DRIFT).
"""
from __future__ import annotations

import numpy as np

from greta.record.params import int_list

BATCH_VERDICTS = ("PASS_BATCH_INVARIANT", "FAIL_BATCH_INVARIANT", "BATCH_DRIFT")
LOGITS_FILE = "batch_logits.npz"


def batch_plan(params) -> tuple[list[int], list[int]]:
    """(prompt lengths, decode steps) per request: the params' lists, else lengths drawn from a generator
    seeded by params.seed, uniform in [ctx/2, ctx], and gen steps for every request."""
    n, ctx = params.batch, params.ctx
    if params.batch_lengths:
        lengths = int_list("batch_lengths", params.batch_lengths, n, 1, ctx, "")
    else:
        lengths = np.random.default_rng(params.seed).integers(max(1, ctx // 2), ctx, endpoint=True, size=n).tolist()
    gens = int_list("batch_gen", params.batch_gen, n, 1, params.gen, "") if params.batch_gen else [params.gen] * n
    return [int(v) for v in lengths], [int(v) for v in gens]


def compared_steps(span: int, gen: int) -> int:
    """Decode steps a request compares: span - 1 (span counts the prefill's row), at most its gen."""
    return min(span - 1, gen)


def _diff(x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
    """(max |x - y|, bit-identical) of two fp32 arrays."""
    exact = bool(np.array_equal(x.view(np.uint32), y.view(np.uint32)))
    return float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()), exact


def request_row(b: int, length: int, gen: int, alone, in_batch, ref) -> dict:
    """One request's line of the table: its (a) vs (b) and (b) vs (c) figures."""
    a, x, c = (np.asarray(v, dtype=np.float32) for v in (alone, in_batch, ref))
    d_ab, e_ab = _diff(a, x)
    d_bc, e_bc = _diff(x, c)
    finite = bool(np.isfinite(a).all() and np.isfinite(x).all() and np.isfinite(c).all())
    agree = float((x.argmax(-1) == c.argmax(-1)).mean())
    return {"request": b, "prompt_tokens": length, "decode_steps": gen, "compared_rows": int(x.shape[0]),
            "alone_vs_batch_max_abs_diff": d_ab, "batch_vs_reference_max_abs_diff": d_bc,
            "max_abs_diff": max(d_ab, d_bc), "bit_exact": e_ab and e_bc and finite, "finite": finite,
            "top1_agreement": agree}


def batch_metrics(rows: list[dict]) -> dict:
    """metrics.json of a batch record: the worst request's figures at the top (max_abs_diff, bit_exact over
    all requests), then the per-request table."""
    worst = max(rows, key=lambda r: (r["max_abs_diff"], not r["bit_exact"]))
    return {"span": max(r["compared_rows"] for r in rows), "finite": all(r["finite"] for r in rows),
            "max_abs_diff": worst["max_abs_diff"], "bit_exact": all(r["bit_exact"] for r in rows),
            "top1_agreement": min(r["top1_agreement"] for r in rows), "requests": len(rows),
            "worst_request": worst["request"], "inexact_requests": [r["request"] for r in rows if not r["bit_exact"]],
            "per_request": rows}


def batch_verdict(m: dict, kv_aligned: int) -> tuple[str, str]:
    """(verdict, one-line reason) from batch_metrics' dict."""
    figures = (f"max_abs_diff={m['max_abs_diff']:.6g} (request {m['worst_request']}), bit_exact={m['bit_exact']}, "
               f"{m['requests']} requests")
    if not m["finite"]:
        return "FAIL_BATCH_INVARIANT", f"non-finite logits ({figures})"
    if not kv_aligned:
        return "BATCH_DRIFT", f"kv_aligned=0: batch, alone and prefill use different ops, drift measured ({figures})"
    if m["bit_exact"]:
        return "PASS_BATCH_INVARIANT", f"every request bit-identical alone, in the batch and in its reference ({figures})"
    return "FAIL_BATCH_INVARIANT", f"requests {m['inexact_requests'][:8]} differ ({figures})"


def metrics_from_logits(arrays: dict, lengths: list[int], gens: list[int]) -> dict:
    """batch_metrics recomputed from batch_logits.npz's arrays (verify holds metrics.json against it)."""
    batch = arrays["batch"]
    rows, start = [], 0
    for b, n in enumerate(arrays["rows"].tolist()):
        x = batch[start:start + n]
        a = (x.view(np.uint32) ^ arrays["alone_xor"][start:start + n]).view(np.float32)
        c = (x.view(np.uint32) ^ arrays["reference_xor"][start:start + n]).view(np.float32)
        rows.append(request_row(b, lengths[b], gens[b], a, x, c))
        start += n
    return batch_metrics(rows)


def logits_arrays(alone: list, in_batch: list, ref: list) -> dict:
    """batch_logits.npz: (b) in full, fp32 [rows of all requests, V]; (a) and (c) as the XOR of their bits with
    (b)'s (uint32: all zero where bit-identical, so a passing record stores them in almost no space, and
    each is recovered exactly as (b) ^ xor); rows[b]: how many rows request b has."""
    x = np.concatenate([np.asarray(v, dtype=np.float32) for v in in_batch])
    a = np.concatenate([np.asarray(v, dtype=np.float32) for v in alone])
    c = np.concatenate([np.asarray(v, dtype=np.float32) for v in ref])
    return {"batch": x, "alone_xor": a.view(np.uint32) ^ x.view(np.uint32),
            "reference_xor": c.view(np.uint32) ^ x.view(np.uint32),
            "rows": np.array([len(v) for v in in_batch], dtype=np.int64)}


def step_floor_bytes(weight_bytes: float, kv_bytes_per_token: int, positions: list[int]) -> float:
    """Bytes one decode step must read at best: the weights once, plus each live sequence's KV up to its
    position."""
    return float(weight_bytes + kv_bytes_per_token * sum(positions))


def throughput(prefill_s: float | None, prefill_tokens: int, steps: list[dict], copy_gbps: float | None) -> dict:
    """Prefill tokens/s; decode ms per step and tokens/s over the steps where the whole batch was live (the
    figure at B), and over all steps; the floor per step from step_floor_bytes over the copy bandwidth."""
    out: dict = {"prefill_tokens": prefill_tokens}
    if prefill_s:
        out["prefill_tokens_per_s"] = prefill_tokens / prefill_s
    full = max((s["rows"] for s in steps), default=0)
    for name, sel in (("full_batch", [s for s in steps if s["rows"] == full]), ("all_steps", steps)):
        if not sel:
            continue
        ms = float(np.median([s["ms"] for s in sel]))
        toks = sum(s["rows"] for s in sel) / (sum(s["ms"] for s in sel) / 1e3)
        fig = {"steps": len(sel), "rows": full if name == "full_batch" else None, "ms_per_step_median": ms,
               "tokens_per_s": toks}
        if copy_gbps:
            floor_ms = float(np.median([s["floor_bytes"] for s in sel])) / (copy_gbps * 1e9) * 1e3
            fig.update(floor_ms_per_step=floor_ms, floor_tokens_per_s=(full if name == "full_batch" else
                       sum(s["rows"] for s in sel) / len(sel)) / floor_ms * 1e3, ratio_of_floor=floor_ms / ms)
        out[name] = fig
    return out
