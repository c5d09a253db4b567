"""The audit record: one never-overwritten directory per run (see docs/RECORD.md); report.md is rendered by
greta.reports.run_report and handed to Record.finish."""
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
from greta.record.files import (MANIFEST, STATEMENTS_FORMAT, TYPES, Manifest, Metadata, Metrics, Perf, VramSummary, Verdict,
                                atomic_write_bytes, atomic_write_text, jsonable as _jsonable, sha256_file, write_json)
from greta.record.kinds import SPECS
from greta.record.params import Params, dtype_bytes
from greta.record.rundir import allocate_run_dir, enclosing_record, nested_message, resolve_out_root
from greta.record.samples import write_samples_csv

from greta.paths import REPO_ROOT as REPO, record_argv
from greta.terminal import echo

__all__ = ["MANIFEST", "RecordError", "Record", "atomic_write_bytes", "atomic_write_text", "sha256_file", "seal",
           "seal_hmac", "SEAL_KEY_ENV", "record_files", "preflight", "expected_bytes", "git_state", "versions", "machine",
           "verdict_record", "roofline"]


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


def machine() -> dict:
    """What defines a run's bits beyond the versions: the CPU model, the BLAS torch was built with, and the GPU
    driver (NVIDIA's kernel module; None without one). greta reproduce compares them (greta.record.reproduction)."""
    import re

    import torch

    def first(path, pattern):
        try:
            m = re.search(pattern, Path(path).read_text(errors="replace"), re.M)
        except OSError:
            return None
        return m.group(1).strip() if m else None

    blas = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return {"cpu_model": first("/proc/cpuinfo", r"^model name\s*:\s*(.+)$") or platform.processor() or platform.machine(),
            "blas": blas.group(1) if blas else None,
            "gpu_driver": first("/proc/driver/nvidia/version", r"Kernel Module\s+(\S+)")}


def probe_name_parts(params: Params) -> list[str]:
    """The parts of a probe run directory's name: <model>-ctx<ctx>-kv<0|1>[-tp<N>], then its kind's own (e.g.
    b4); greta.record.rundir adds the time before and a random suffix after."""
    parts = [Path(params.model).name or "model", f"ctx{params.ctx}", f"kv{params.kv_aligned}"]
    parts += [f"tp{params.tp}"] if params.tp > 1 else []
    return parts + SPECS[params.probe].name_parts(params)


def new_probe_dir(out_root, params: Params) -> Path:
    """A fresh directory for a probe's record (greta.record.rundir, the one allocator), once the output folder
    proved writable with room for it. out_root None or "outputs": the checkout's outputs/, from any directory."""
    root = resolve_out_root(out_root or "outputs").resolve()
    preflight(root, params)
    return allocate_run_dir(root, params.probe, probe_name_parts(params))


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


NOTEBOOKS_AND_PLOTS_BYTES = 16 * 2**20  # a record's files besides its logits, generously


def expected_bytes(params: Params | None) -> int:
    """Rough size of a probe's record: its logits (2 x span x vocab fp32, before compression; the batch probe's
    (b) per request, its (a) and (c) kept as XOR; every other kind holds batch at 1), notebooks and plots.
    None: a record without logits (an oracle's)."""
    if params is None:
        return NOTEBOOKS_AND_PLOTS_BYTES
    return 2 * params.span * params.batch * model_vocab(params.model) * 4 + NOTEBOOKS_AND_PLOTS_BYTES


def preflight(out_root, params: Params | None):
    """Before a run: the output folder lies in no record, can be created and written, and has room for the
    record of a probe with these params (None: a record without logits, an oracle's)."""
    root = resolve_out_root(out_root)
    outer = enclosing_record(root)
    if outer is not None:
        raise RecordError(nested_message(root, outer))
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".greta-write-test-{secrets.token_hex(3)}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RecordError(f"output folder {echo(str(root))} is not writable ({e.strerror or e}): "
                          "pass -o <a writable folder>") from None
    free = shutil.disk_usage(root).free
    need = 2 * expected_bytes(params)
    if free < need:
        raise RecordError(f"output folder {echo(str(root))} has {free / 2**20:.0f} MiB free, a record needs about "
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


def seal(run_dir, params: dict | None = None) -> Path:
    """Write manifest.json last and atomically: the sha256 and size of every other file of the record,
    the params (params.json's dict; None: read from the record's params.json), versions, git commit and dirty
    flag; with GRETA_SEAL_KEY set, an HMAC of all that.
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
    def __init__(self, path: Path, params: Params):
        self.path, self.params = Path(path), params
        self.meta: dict = {}

    @classmethod
    def create(cls, params: Params, out_root="outputs", run_dir=None) -> "Record":
        """A new record: a fresh directory from greta.record.rundir (or run_dir, which must not hold a record
        yet: the audit creates it for its notebook first), with params.json and metadata.json written."""
        if run_dir is None:
            path = new_probe_dir(out_root, params)
        else:
            path = Path(run_dir)
            preflight(path.parent, params)
            if (path / "params.json").exists():
                raise FileExistsError(f"run directory {path} already holds a record; records are never overwritten — pick a new run_dir")
            path.mkdir(parents=True, exist_ok=True)
        rec = cls(path, params)
        rec.write_json("params.json", params.to_dict())
        rec.meta = {"run_id": path.name, "probe": params.probe, **git_state(), "host": platform.node(),
                    "platform": platform.platform(), "argv": record_argv(sys.argv, path), "versions": versions(), "machine": machine(),
                    "seed": params.seed, "model": params.model, "started_utc": _now(), "finished_utc": None,
                    "statements": STATEMENTS_FORMAT}
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

    def finish(self, *, load, perf, metrics, vram_summary, samples, verdict, report: str):
        """Write the finished record's files through their types; ``report`` is report.md's text
        (greta.reports.run_report renders it from the same data, after :meth:`finish_meta`)."""
        self.finish_meta(load)
        files = {"metadata.json": Metadata.from_dict(self.meta), "perf.json": Perf.from_dict(perf),
                 "metrics.json": Metrics.from_dict(metrics) if metrics is not None else None,
                 "vram.json": VramSummary.from_dict(vram_summary), "verdict.json": Verdict.from_dict(verdict)}
        for name, typed in files.items():
            if typed is not None:
                write_json(self.path / name, typed)
        write_samples_csv(self.path / "vram_samples.csv", samples)
        atomic_write_text(self.path / "report.md", report)
        seal(self.path, self.params.to_dict())

    def finish_meta(self, load: dict) -> dict:
        """metadata.json's figures from the load phase, and the finish time (kept if already set)."""
        self.meta.update({
            "finished_utc": self.meta.get("finished_utc") or _now(), "device_name": load.get("device_name"), "model_hash": load.get("model_hash"),
            "weights_source": load.get("weights_source"), "param_count": load.get("param_count"),
            "config": load.get("config"), "torch_threads": load.get("torch_threads"),
            "weights_mb": load.get("weights_mb"), "kv_cache_mb": load.get("kv_cache_mb"),
            "kv_cache_capacity": load.get("kv_cache_capacity"),
            "prompt": load.get("prompt"),  # source (synthetic | token file | text+tokenizer), token count, ids sha256
        })
        if load.get("engine"):  # B3.77: the engine under audit (greta, or a peer: greta.engine.peers)
            self.meta["engine"] = load["engine"]
        if load.get("tp"):  # tensor parallel: world size and the exact reduction (a tp=1 record has no key)
            self.meta["tp"] = load["tp"]
        if load.get("tree_segments"):  # tp_invariant=1: S, the segment tree the run's wo/w2 summed K in
            self.meta["tree_segments"] = load["tree_segments"]
        return self.meta


def verdict_record(params: Params, verdict: str, reason: str, failed_phase: str | None = None,
                   metrics: dict | None = None, tokens=None) -> dict:
    """The verdict.json dict (docs/RECORD.md): the verdict, its reason, the phase that failed (None when the
    run finished), bit_exact from the metrics (None without them), the run's kv_aligned and perturb, and
    the generated tokens (None when no phase produced any)."""
    return Verdict(verdict=verdict, reason=reason, failed_phase=failed_phase,
                   bit_exact=metrics["bit_exact"] if metrics else None, kv_aligned=params.kv_aligned,
                   perturb=params.perturb, tokens=tokens).to_dict()


# --- cross-checks ---------------------------------------------------------------------------
def roofline(params: Params, cfg_dict: dict | None, perf: dict, ceilings: dict | None) -> dict:
    """Each timed phase against the floor set by the ceilings measured in this run; under tensor parallelism
    per rank, against rank 0's ceilings: 1/tp of the FLOPs (heads, MLP and vocab split evenly) and one rank's
    bytes (ModelConfig.rank_decode_bytes), the reductions counted as free (the issue's floor)."""
    if not cfg_dict or not ceilings:
        return {"available": False, "why": "load or ceilings phase did not finish"}
    cfg = ModelConfig(**cfg_dict)
    rate = ceilings["matmul_tflops"] * 1e12
    bw = ceilings["copy_gbps"] * 1e9
    nbytes = dtype_bytes(params.dtype)
    ctx, gen, span, tp = params.ctx, params.gen, params.span, params.tp
    out = {"available": True, "ceilings": ceilings, **({"per_rank_of_tp": tp} if tp > 1 else {})}
    if perf["prefill"].get("wall_s"):
        flops = cfg.prefill_flops(ctx) / tp
        floor = flops / rate
        out["prefill"] = {"flops": flops, "floor_s": floor, "wall_s": perf["prefill"]["wall_s"],
                          "ratio": perf["prefill"]["wall_s"] / floor}
    if perf["decode"].get("wall_s"):
        per_tok = cfg.rank_decode_bytes(ctx + gen // 2, tp, nbytes)
        floor_ms = per_tok / bw * 1e3
        ms = perf["decode"]["wall_s"] / gen * 1e3
        out["decode"] = {"bytes_per_token": per_tok, "floor_ms_per_token": floor_ms, "ms_per_token": ms,
                         "ratio": ms / floor_ms}
    if perf["reference"].get("wall_s"):
        flops = (cfg.prefill_flops(ctx + span - 1) + 2.0 * (span - 1) * cfg.vocab_size * cfg.hidden_size) / tp
        out["reference"] = {"flops": flops, "floor_s": flops / rate, "wall_s": perf["reference"]["wall_s"],
                            "ratio": perf["reference"]["wall_s"] / (flops / rate)}
    return out
