"""The batch probe as data (no torch): which requests it runs, how their logits compare, its verdict and its
throughput against the roofline floor.

Per request b the probe holds three sets of logits over the same positions (the prefill's last position,
then each compared decode step, all on the tokens the batch generated):
  (a) alone      decoded in a batch of one,
  (b) in batch   decoded with every other request of the batch,
  (c) reference  the teacher-forced prefill of prompt + generated tokens.
kv_aligned=1: (a), (b) and (c) must be bit-identical for every request (PASS_BATCH_INVARIANT, else
FAIL_BATCH_INVARIANT); kv_aligned=0: the differences are measured (BATCH_DRIFT).

Each request's row of metrics.json carries per compared position (per_position[j]: step j, the absolute position
of the token whose logits the row holds) the fingerprint of each path's row (greta.record.fingerprints), so
greta verify, analyze and reproduce can re-check a record whose batch_logits.npz is absent:
    fingerprint_problems(metrics)   # where bit_exact / top1_agreement disagree with them: [] when they agree or are absent
    fingerprint_rows(metrics)       # every request's rows, flat, as greta reproduce compares them
"""
from __future__ import annotations

import numpy as np

from greta.record.fingerprints import row_fingerprint
from greta.record.params import int_list

BATCH_VERDICTS = ("PASS_BATCH_INVARIANT", "FAIL_BATCH_INVARIANT", "BATCH_DRIFT")
LOGITS_FILE = "batch_logits.npz"
PATHS = ("alone", "batch", "reference")  # (a), (b), (c): the names of their fingerprints


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
    # row j: the logits after the token at position length - 1 + j (the prompt's last, then each decode step's)
    prints = [{"step": j, "position": length - 1 + j,
               "fingerprint": {path: row_fingerprint(v[j]) for path, v in zip(PATHS, (a, x, c))}}
              for j in range(x.shape[0])]
    return {"request": b, "prompt_tokens": length, "decode_steps": gen, "compared_rows": int(x.shape[0]),
            "alone_vs_batch_max_abs_diff": d_ab, "batch_vs_reference_max_abs_diff": d_bc,
            "max_abs_diff": max(d_ab, d_bc), "bit_exact": e_ab and e_bc and finite, "finite": finite,
            "top1_agreement": agree, "per_position": prints}


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


def fingerprint_rows(m: dict) -> list[dict] | None:
    """Every request's per_position rows, flat, each with its "request" (what greta reproduce compares when the
    original has no batch_logits.npz); None when a request has none (a record made before fingerprints)."""
    reqs = m.get("per_request") if isinstance(m, dict) else None
    if not isinstance(reqs, list) or not reqs or not all(isinstance(r, dict) and isinstance(r.get("per_position"), list)
                                                         and r["per_position"] for r in reqs):
        return None
    return [{"request": r.get("request", b), **p} for b, r in enumerate(reqs) for p in r["per_position"]]


def _request_prints(b: int, r: dict) -> tuple[list[bool], list[bool]]:
    """(per position: the three paths' sha256 equal, the batch's top-1 id the reference's) of request b's row;
    raises KeyError/TypeError/IndexError/ValueError when its fingerprints are incomplete."""
    prints = [p["fingerprint"] for p in r["per_position"]]
    if len(prints) != r["compared_rows"] or not prints:
        raise ValueError(f"{len(prints)} fingerprinted positions, {r['compared_rows']} compared rows")
    equal = [len({fp[path]["sha256"] for path in PATHS}) == 1 for fp in prints]
    return equal, [fp["batch"]["top_ids"][0] == fp["reference"]["top_ids"][0] for fp in prints]


def _request_problems(b: int, r: dict, equal: list[bool], agree: list[bool]) -> list[str]:
    errors, finite = [], bool(r.get("finite"))
    if r.get("bit_exact") != (finite and all(equal)):
        unequal = [j for j, e in enumerate(equal) if not e]
        errors.append(f"metrics.json request {b} bit_exact is {r.get('bit_exact')} but the fingerprints say "
                      + (f"its alone, batch and reference rows differ at step(s) {', '.join(map(str, unequal[:8]))}"
                         if unequal else "every position is bit-identical" + ("" if finite else ", with non-finite logits")))
    if finite and r.get("top1_agreement") != sum(agree) / len(agree):
        errors.append(f"metrics.json request {b} top1_agreement is {r.get('top1_agreement')} but the fingerprints' "
                      f"top-1 ids agree at {sum(agree)} of {len(agree)} positions")
    return errors


def fingerprint_problems(m: dict) -> list[str]:
    """Where metrics.json's bit_exact, top1_agreement and inexact_requests (each request's and the batch's)
    disagree with its fingerprints (one line each); [] when they agree or the record has none."""
    reqs = m.get("per_request") if isinstance(m, dict) else None
    if not isinstance(reqs, list) or not any(isinstance(r, dict) and "per_position" in r for r in reqs):
        return []
    errors, exact, agreement = [], [], []
    for b, r in enumerate(reqs):
        try:
            equal, agree = _request_prints(b, r)
        except (KeyError, TypeError, IndexError, ValueError) as e:
            return [f"metrics.json request {b} has no complete fingerprint of its alone, batch and reference rows "
                    f"({type(e).__name__}: {e})"]
        errors += _request_problems(b, r, equal, agree)
        exact.append(bool(r.get("finite")) and all(equal))
        agreement.append(sum(agree) / len(agree))
    if m.get("bit_exact") != all(exact):
        errors.append(f"metrics.json bit_exact is {m.get('bit_exact')} but the fingerprints say "
                      + ("every request is bit-identical" if all(exact) else
                         f"requests {[b for b, e in enumerate(exact) if not e][:8]} are not"))
    if m.get("inexact_requests") != [r.get("request", b) for b, r in enumerate(reqs) if not exact[b]]:
        errors.append("metrics.json inexact_requests is not the requests whose fingerprints differ")
    if m.get("finite") and m.get("top1_agreement") != min(agreement):
        errors.append(f"metrics.json top1_agreement is {m.get('top1_agreement')} but the fingerprints' lowest is "
                      f"{min(agreement)}")
    return errors


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
