"""The audit record: one never-overwritten directory per run, and its report.md (see docs/RECORD.md)."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from greta.engine.config import ModelConfig
from greta.record.files import (MANIFEST, TYPES, Manifest, Metadata, Metrics, Perf, VramSummary, Verdict,
                                atomic_write_bytes, atomic_write_text, jsonable as _jsonable, sha256_file, write_json)
from greta.record.params import dtype_bytes
from greta.record.rundir import allocate_run_dir, resolve_out_root
from greta.record.samples import write_samples_csv

from greta.paths import REPO_ROOT as REPO

__all__ = ["MANIFEST", "RecordError", "Record", "atomic_write_bytes", "atomic_write_text", "sha256_file", "seal",
           "seal_hmac", "SEAL_KEY_ENV", "record_files", "preflight", "expected_bytes", "git_state", "versions",
           "verdict_record", "roofline", "render_report", "results_row", "interpret"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_state() -> dict:
    """Commit and dirty flag of the checkout. A copy without .git (e.g. a working tree shipped to a GPU
    machine) takes them from GRETA_GIT_COMMIT / GRETA_GIT_DIRTY, set by whoever made the copy."""
    if os.environ.get("GRETA_GIT_COMMIT"):
        return {"commit": os.environ["GRETA_GIT_COMMIT"], "dirty": {"1": True, "0": False}.get(os.environ.get("GRETA_GIT_DIRTY", "")),
                "commit_source": "GRETA_GIT_COMMIT"}

    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "hip": torch.version.hip, "numpy": np.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def probe_name_parts(params) -> list[str]:
    """The parts of a probe run directory's name: <model>-ctx<ctx>-kv<0|1> (greta.record.rundir adds the
    time before and a random suffix after)."""
    return [Path(params["model"]).name or "model", f"ctx{params['ctx']}", f"kv{params['kv_aligned']}"]


def run_id(params) -> str:
    """Transitional, for greta.reports.notebooks.run_audit until it calls greta.record.rundir.allocate_run_dir
    (which also creates the directory, so two runs cannot collide): the name allocate_run_dir would give."""
    stamp = datetime.now(timezone.utc).strftime("%H%M%S")
    return "-".join([stamp, *probe_name_parts(params), secrets.token_hex(2)])


class RecordError(OSError):
    """The record cannot be written (unwritable or full output folder); one line, says what to do."""


# When the model's config cannot be read here (the run will then end in FAIL_ERROR), size the record for
# Llama 3's vocabulary, the largest of the presets.
FALLBACK_VOCAB = 128256


def model_vocab(model: str) -> int:
    """The model's vocabulary size, from its preset, config.json or .gguf header (no weights are read)."""
    from greta.engine.source import load_config  # lazily: verify reads records without importing torch

    try:
        return load_config(model).vocab_size
    except Exception:  # noqa: BLE001 - a bad model is the run's error to record, not the size estimate's
        return FALLBACK_VOCAB


def expected_bytes(params) -> int:
    """Rough size of a record: logits (2 x span x vocab fp32, before compression), notebooks and plots."""
    span = params["span"]
    return (2 * span * model_vocab(params["model"]) * 4 if span else 0) + 16 * 2**20  # span 0: a record without logits (oracle)


def preflight(out_root, params):
    """Before a run: the output folder can be created and written, and has room for the record."""
    root = resolve_out_root(out_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".greta-write-test-{secrets.token_hex(3)}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RecordError(f"output folder {root} is not writable ({e.strerror or e}): pass -o <a writable folder>") from None
    free = shutil.disk_usage(root).free
    need = 2 * expected_bytes(params)
    if free < need:
        raise RecordError(f"output folder {root} has {free / 2**20:.0f} MiB free, a record needs about "
                          f"{need / 2**20:.0f} MiB: free some space or pass -o <another folder>")


def record_files(run_dir) -> dict[str, Path]:
    """The files a manifest covers, by path relative to run_dir (posix), sorted: every file under run_dir
    except manifest.json itself and hidden files (e.g. the .tmp of an atomic write)."""
    d = Path(run_dir)
    files = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and rel != MANIFEST and not p.name.startswith("."):
            files[rel] = p
    return files


SEAL_KEY_ENV = "GRETA_SEAL_KEY"


def seal_hmac(manifest: dict, key: str) -> str:
    """HMAC-SHA256 (hex) of the manifest without its hmac, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != "hmac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_jsonable)
    return hmac.new(key.encode("utf-8"), canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def seal(run_dir, params=None) -> Path:
    """Write manifest.json last and atomically: the sha256 and size of every other file of the record,
    the params, versions, git commit and dirty flag; with GRETA_SEAL_KEY set, an HMAC of all that.
    Re-sealing (after the notebooks add their files) replaces it. `python -m greta verify` checks it."""
    d = Path(run_dir)
    if params is None:
        params = json.loads((d / "params.json").read_text())
    files = {rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in record_files(d).items()}
    git = git_state()
    man = Manifest(run_id=d.name, sealed_utc=_now(), params=params, commit=git.pop("commit"), dirty=git.pop("dirty"),
                   versions=versions(), files=files, extra=git)
    body = json.loads(json.dumps(man.to_dict(), default=_jsonable))  # the form verify will read back
    if os.environ.get(SEAL_KEY_ENV):
        body["hmac"] = seal_hmac(body, os.environ[SEAL_KEY_ENV])
    write_json(d / MANIFEST, body)
    return d / MANIFEST


class Record:
    def __init__(self, path: Path, params):
        self.path, self.params = Path(path), params
        self.meta: dict = {}

    @classmethod
    def create(cls, params, out_root="outputs", run_dir=None) -> "Record":
        """A new record: a fresh directory from greta.record.rundir (or run_dir, which must not hold a record
        yet: the audit creates it for its notebook first), with params.json and metadata.json written."""
        if run_dir is None:
            preflight(out_root, params)
            path = allocate_run_dir(out_root, params["probe"], probe_name_parts(params))
        else:
            path = Path(run_dir)
            preflight(path.parent, params)
            if (path / "params.json").exists():
                raise FileExistsError(f"run directory {path} already holds a record; records are never overwritten — pick a new run_dir")
            path.mkdir(parents=True, exist_ok=True)
        rec = cls(path, params)
        rec.write_json("params.json", params)
        rec.meta = {"run_id": path.name, "probe": params["probe"], **git_state(), "host": platform.node(),
                    "platform": platform.platform(), "argv": sys.argv, "versions": versions(),
                    "seed": params["seed"], "model": params["model"], "started_utc": _now(), "finished_utc": None}
        rec.write_json("metadata.json", rec.meta)
        return rec

    def write_json(self, name: str, obj) -> Path:
        """A record file; one of greta.record.files' types is written through that type (with its format)."""
        if name in TYPES and isinstance(obj, dict):
            obj = TYPES[name].from_dict(obj)
        return write_json(self.path / name, obj)

    def write_npz(self, name: str, **arrays) -> Path:
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        p = self.path / name
        atomic_write_bytes(p, buf.getvalue())
        return p

    def finish(self, *, load, perf, metrics, vram_summary, samples, verdict):
        self.meta.update({
            "finished_utc": _now(), "device_name": load.get("device_name"), "model_hash": load.get("model_hash"),
            "weights_source": load.get("weights_source"), "param_count": load.get("param_count"),
            "config": load.get("config"), "torch_threads": load.get("torch_threads"),
            "weights_mb": load.get("weights_mb"), "kv_cache_mb": load.get("kv_cache_mb"),
            "kv_cache_capacity": load.get("kv_cache_capacity"),
            "prompt": load.get("prompt"),  # source (synthetic | token file | text+tokenizer), token count, ids sha256
        })
        files = {"metadata.json": Metadata.from_dict(self.meta), "perf.json": Perf.from_dict(perf),
                 "metrics.json": Metrics.from_dict(metrics) if metrics is not None else None,
                 "vram.json": VramSummary.from_dict(vram_summary), "verdict.json": Verdict.from_dict(verdict)}
        for name, typed in files.items():
            if typed is not None:
                write_json(self.path / name, typed)
        write_samples_csv(self.path / "vram_samples.csv", samples)
        written = {name: typed.to_dict() if typed is not None else None for name, typed in files.items()}
        atomic_write_text(self.path / "report.md", render_report(
            self.params, written["metadata.json"], written["perf.json"], written["metrics.json"],
            written["vram.json"], written["verdict.json"]))
        seal(self.path, self.params)


def verdict_record(params, verdict: str, reason: str, failed_phase: str | None = None,
                   metrics: dict | None = None, tokens=None) -> dict:
    """The verdict.json dict (docs/RECORD.md): the verdict, its reason, the phase that failed (None when the
    run finished), bit_exact from the metrics (None without them), the run's kv_aligned and perturb, and
    the generated tokens (None when no phase produced any)."""
    return Verdict(verdict=verdict, reason=reason, failed_phase=failed_phase,
                   bit_exact=metrics["bit_exact"] if metrics else None, kv_aligned=params["kv_aligned"],
                   perturb=params["perturb"], tokens=tokens).to_dict()


# --- cross-checks ---------------------------------------------------------------------------
def roofline(params: dict, cfg_dict: dict | None, perf: dict, ceilings: dict | None) -> dict:
    """Each timed phase against the floor set by the ceilings measured in this run."""
    if not cfg_dict or not ceilings:
        return {"available": False, "why": "load or ceilings phase did not finish"}
    cfg = ModelConfig(**cfg_dict)
    rate = ceilings["matmul_tflops"] * 1e12
    bw = ceilings["copy_gbps"] * 1e9
    nbytes = dtype_bytes(params["dtype"])
    ctx, gen, span = params["ctx"], params["gen"], params["span"]
    out = {"available": True, "ceilings": ceilings}
    if perf["prefill"].get("wall_s"):
        flops = cfg.prefill_flops(ctx)
        floor = flops / rate
        out["prefill"] = {"flops": flops, "floor_s": floor, "wall_s": perf["prefill"]["wall_s"],
                          "ratio": perf["prefill"]["wall_s"] / floor}
    if perf["decode"].get("wall_s"):
        per_tok = cfg.decode_bytes(ctx + gen // 2, nbytes)
        floor_ms = per_tok / bw * 1e3
        ms = perf["decode"]["wall_s"] / gen * 1e3
        out["decode"] = {"bytes_per_token": per_tok, "floor_ms_per_token": floor_ms, "ms_per_token": ms,
                         "ratio": ms / floor_ms}
    if perf["reference"].get("wall_s"):
        flops = cfg.prefill_flops(ctx + span - 1) + 2.0 * (span - 1) * cfg.vocab_size * cfg.hidden_size
        out["reference"] = {"flops": flops, "floor_s": flops / rate, "wall_s": perf["reference"]["wall_s"],
                            "ratio": perf["reference"]["wall_s"] / (flops / rate)}
    return out


# --- report.md --------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}", none="—"):
    return none if x is None else fmt.format(x)


def results_row(params, metrics, vram_summary, verdict) -> str:
    diff = _f(metrics and metrics["max_abs_diff"], "{:.6f}")
    top1 = _f(metrics and metrics["top1_agreement"], "{:.4f}")
    peak = _f(vram_summary.get("peak_vram_mb"), "{:.0f}")
    return f"| {params['ctx']} | {params['kv_aligned']} | {peak} | {diff} | {top1} | {verdict['verdict']} |"


def render_report(params, meta, perf, metrics, vs, verdict) -> str:
    dev = meta.get("device_name") or params["device"]
    day = (meta.get("started_utc") or "")[:10]
    model = params["model"]
    src = meta.get("weights_source") or "?"
    L = [f"# B3.77 — Single-point {params['ctx']} long-context probe ({dev})", ""]
    commit = (meta.get("commit") or "unknown")[:12] + (" (dirty)" if meta.get("dirty") else "")
    L += [f"Run `{meta['run_id']}` · started {meta.get('started_utc')} · greta {commit} · host {meta.get('host')}", ""]
    L += ["## Objective",
          f"Prefill a {params['ctx']}-token prompt through the batched prefill path, decode {params['gen']} tokens "
          f"greedily through the one-token decode path, and compare the decode path's logits with the prefill "
          f"path's (one teacher-forced batched pass) over the first {params['span']} generated tokens.", ""]
    L += ["## Matrix",
          f"- Model: `{model}` ({src} weights, seed {params['seed']}, {_f(meta.get('param_count'), '{:,}')} params), "
          f"hash `{meta.get('model_hash')}`",
          f"- Context {params['ctx']} · generation {params['gen']} · span {params['span']} · dtype {params['dtype']} · "
          f"kv_aligned={params['kv_aligned']} · backend {params['backend']} · prefill_chunk {params['prefill_chunk']} · "
          f"kv_block {params['kv_block']}",
          f"- Prompt: {params['prompt']}" + (" (uniform ids from torch's CPU generator seeded with the seed)" if params['prompt'] == 'synthetic' else ""),
          f"- Negative control (perturb): {params['perturb']} · fault injection: {params['fault']}",
          f"- Stop conditions: OOM → FAIL_OOM at once; per-phase timeouts (s) {params['timeouts']}, enforced by killing the worker process → FAIL_TIMEOUT",
          f"- Thresholds (kv_aligned=1): max_abs_diff ≤ {params['thresholds']['max_abs_diff']:g}, p99_abs_diff ≤ "
          f"{params['thresholds']['p99_abs_diff']:g}, top1_agreement ≥ {params['thresholds']['top1_agreement']:g}", ""]
    L += [f"## Results ({dev}, {day})", "",
          "| Context | KV | Peak VRAM (MB) | Max Logits Diff | Top-1 Agreement | Verdict |",
          "|---------|----|----------------|-----------------|-----------------|---------|",
          results_row(params, metrics, vs, verdict), ""]
    if metrics:
        L += [f"- bit_exact: **{metrics['bit_exact']}** · generated tokens agree: {metrics['tokens_agree']} · "
              f"p99 |Δ| {metrics['p99_abs_diff']:.3g} · mean |Δ| {metrics['mean_abs_diff']:.3g} · "
              f"cosine min {metrics['cosine_min']:.8f} · first argmax mismatch: {metrics['first_argmax_mismatch']} · "
              f"distinct reference argmaxes over the span: {metrics['distinct_argmax']}/{metrics['span']}",
              "- Step 0 is the last prompt position (prefill phase, chunked) against the reference pass; "
              "steps 1.. are decode steps.", ""]
    L += [f"Verdict: **{verdict['verdict']}** — {verdict['reason']}", ""]
    L += _timing(perf)
    L += _vram(vs)
    L += ["## Interpretation", *[f"- {x}" for x in interpret(params, perf, metrics, vs, verdict)], ""]
    over = " ".join(f"-p {k}={v}" for k, v in _diff_from_file(params).items())
    L += ["## Reproduce", "```bash", f"python -m greta probe -f <params.yaml> {over}".rstrip(),
          "# params.json in this directory holds every value used", "```", ""]
    L += ["## Provenance", f"- versions: {meta.get('versions')}", f"- platform: {meta.get('platform')}",
          f"- finished: {meta.get('finished_utc')}", ""]
    return "\n".join(L)


def _diff_from_file(params) -> dict:
    return {k: params[k] for k in ("model", "device", "dtype", "ctx", "gen", "span", "kv_aligned", "seed", "perturb")}


def _timing(perf) -> list[str]:
    rf = perf.get("roofline", {})
    L = ["## Timing", "", "| Phase | Status | Wall (s) | Timeout (s) | Roofline floor | Wall / floor |",
         "|---|---|---|---|---|---|"]
    for ph in ("ceilings", "load", "prefill", "decode", "reference"):
        p = perf.get(ph, {})
        r = rf.get(ph, {}) if ph in ("prefill", "decode", "reference") else {}
        floor = ""
        if ph == "decode" and r:
            floor = f"{r['floor_ms_per_token']:.2f} ms/token (measured {r['ms_per_token']:.2f})"
        elif r:
            floor = f"{r['floor_s']:.3g} s"
        ratio = f"{r['ratio']:.1f}×" if r else ""
        L.append(f"| {ph} | {p.get('status')} | {_f(p.get('wall_s'), '{:.2f}')} | {_f(p.get('timeout_s'), '{:g}')} | {floor} | {ratio} |")
    c = rf.get("ceilings")
    if c:
        L += ["", f"Ceilings measured in this run: {c['matmul_dtype']} matmul {c['matmul_tflops']:.1f} TFLOP/s "
              f"({c['matmul_n']}³ product), device copy {c['copy_gbps']:.0f} GB/s ({c['method']}). Prefill floor = "
              "FLOPs / matmul rate (linears 2·P·ctx + causal attention 2·L·H·D·ctx²); decode floor = bytes per "
              "token (weights but the embedding table, plus the KV cache at the mean position) / copy bandwidth."]
    L.append("")
    return L


def _vram(vs) -> list[str]:
    fl = vs["floor"]
    L = ["## VRAM sampling method",
         f"- Backend: **{vs['backend']}**" + (f" (fallback: {vs['fallback_reason']})" if vs.get("fallback_reason") else ""),
         f"- Device info: {vs['device_info']}",
         f"- Sampling period: {vs['sampling_period_sec']} s · samples: {vs['samples_count']} · peak: "
         f"{_f(vs['peak_vram_mb'], '{:.0f}')} MB at t = {_f(vs['peak_timestamp_offset_sec'], '{:.1f}')} s from the start of sampling",
         "- Note: sampled figures can miss micro-spikes between samples; the allocator peaks below are exact.",
         "", "| Phase | Allocator max allocated (MB) | Allocator max reserved (MB) |", "|---|---|---|"]
    for ph, a in vs.get("allocator_peaks", {}).items():
        L.append(f"| {ph} | {_f(a.get('max_allocated_mb'), '{:.0f}')} | {_f(a.get('max_reserved_mb'), '{:.0f}')} |")
    if not vs.get("allocator_peaks"):
        L.append("| — | no device allocator (CPU run) | |")
    L += ["", f"Analytic floor: weights {fl['weights_mb']:.0f} MB + KV cache {fl['kv_cache_mb']:.0f} MB "
          f"= **{fl['total_mb']:.0f} MB**. "
          + ("**Below the floor — these figures cannot be right:** " + "; ".join(vs["below_floor_figures"])
             if vs["below_floor"] else "Every measured peak is at or above it."), ""]
    return L


def interpret(params, perf, metrics, vs, verdict) -> list[str]:
    v = verdict["verdict"]
    out = []
    if metrics:
        out.append(f"**{v} @ ctx={params['ctx']}; max diff={metrics['max_abs_diff']:.6g}; "
                   f"top1={metrics['top1_agreement']:.4f}; bit_exact={metrics['bit_exact']}**")
        if params["perturb"] != "none":
            out.append(f"NEGATIVE CONTROL: the decode path was deliberately broken ({params['perturb']}); "
                       f"this run shows what the check reports when the paths disagree.")
        if params["kv_aligned"] and metrics["bit_exact"]:
            out.append("Decode reproduced the prefill path bit for bit. The paths run different code (a one-token "
                       "step reading the KV cache vs. a chunked batch), on the same tile shapes and KV block order.")
        elif params["kv_aligned"]:
            out.append(f"Not bit-exact: the largest difference is {metrics['max_abs_diff']:.3g}; the verdict "
                       "applies the guardrail's tolerances.")
        else:
            out.append(f"kv_aligned=0: each path used its fastest ops; {metrics['max_abs_diff']:.3g} is the measured "
                       "cost of that in logits.")
        if metrics["distinct_argmax"] <= 1 and metrics["span"] > 1:
            out.append("Warning: the reference argmax is the same at every position; the comparison is degenerate.")
    else:
        out.append(f"**{v}** in phase {verdict['failed_phase']}: {verdict['reason']}")
        done = [ph for ph, p in perf.items() if isinstance(p, dict) and p.get("status") == "ok"]
        out.append(f"Phases completed before the fault: {', '.join(done) or 'none'}.")
    if vs["below_floor"]:
        out.append("VRAM: a measured peak is below weights + KV cache, which is impossible for a correct measurement.")
    elif vs.get("peak_vram_mb") is not None:
        out.append(f"VRAM: sampled peak {vs['peak_vram_mb']:.0f} MB ≥ analytic floor {vs['floor']['total_mb']:.0f} MB, "
                   f"headroom {vs['peak_vram_mb'] - vs['floor']['total_mb']:.0f} MB ({vs['backend']}).")
    r = perf.get("roofline", {})
    if r.get("prefill"):
        out.append(f"Prefill took {r['prefill']['ratio']:.1f}× its roofline floor; decode {r['decode']['ratio']:.1f}× "
                   "its bandwidth floor per token." if r.get("decode") else
                   f"Prefill took {r['prefill']['ratio']:.1f}× its roofline floor.")
        if params["kv_aligned"] and params["backend"] == "torch":
            out.append(f"The torch backend's aligned mode computes a whole {params['prefill_chunk']}-row tile per "
                       "decode step and attention in fp32: it is a reference for exactness, not for speed.")
    return out
