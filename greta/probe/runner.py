"""The probe runner, every kind's: phases in a killable worker, per-phase timeouts, VRAM sampling, the record.

    run_dir = run_probe(load_params("params/b3_77.yaml", {"ctx": 32768}))

Phases: ceilings (matmul rate and copy bandwidth, measured first so their buffers are gone before the
model loads), load (model, KV cache, prompt), prefill, decode, reference; what each does is the probe kind's
job, and the record its finisher (greta.probe.kinds). A probe failure never raises: it ends in a FAIL_*
verdict and a complete record.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from greta.record import store as record
from greta.record.samples import (RANK_SAMPLES_CSV, floor_for, read_samples_csv, write_rank_samples_csv,
                                  write_samples_csv)
from greta.probe import vram
from greta.engine.config import ModelConfig
from greta.engine.source import load_config
from greta.record.metrics import FAIL
from greta.record.params import PHASES, Params
from greta.probe.kinds import kind_of
from greta.probe.ranks import Workers
from greta.terminal import shown


class ProbeInterrupted(KeyboardInterrupt):
    """Raised by run_probe after Ctrl-C / SIGTERM, once the INTERRUPTED record is written."""

    def __init__(self, run_dir: Path, how: str):
        super().__init__(f"{how}; record: {run_dir}")
        self.run_dir, self.how = run_dir, how


class _Term(KeyboardInterrupt):
    """SIGTERM, turned into an exception in the main thread."""


def _on_term(signum, frame):
    raise _Term()


def _interrupted(e: KeyboardInterrupt, phase: str) -> tuple[str, dict]:
    """(how, payload) for an interrupt during phase: how is "SIGTERM" or "SIGINT (Ctrl-C)"."""
    how = "SIGTERM" if isinstance(e, _Term) else "SIGINT (Ctrl-C)"
    return how, {"error": f"interrupted by {how} during {phase}; worker killed"}


class _Bars:
    """Per-phase progress, to where someone can see it without it piling up in a notebook:
    - a launcher tails a progress file (greta audit: PROGRESS_ENV is set): one line per update goes there;
    - inside a notebook kernel: nothing live, one final line when the probe ends;
    - a terminal: a text bar per phase on stderr.
    Every bar ends at 100% when its phase succeeds (a phase that reports no steps, such as ceilings or load,
    counts as one step: itself), or at what it counted, followed by how the phase ended."""

    def __init__(self, enabled: bool):
        import os
        import sys

        from greta.reports.notebooks import PROGRESS_ENV

        self.enabled, self.bar, self.phase, self.last = enabled, None, None, None
        self.to_file = bool(os.environ.get(PROGRESS_ENV))
        self.in_kernel = "ipykernel" in sys.modules and not self.to_file

    def update(self, phase: str, done: int, total: int, unit: str = "phase", status: str | None = None):
        if not self.enabled:
            return
        self.last = (phase, done, total, unit)
        if self.to_file:
            from greta.reports.notebooks import report_progress

            report_progress("phase", phase, done, total, unit, *([status] if status else []))
            return
        if self.in_kernel:
            return
        if phase != self.phase:
            self.close()
            from tqdm import tqdm  # text bars: tqdm.auto would want ipywidgets inside a kernel

            self.bar, self.phase = tqdm(total=total, desc=phase, leave=False), phase
        self.bar.unit = unit
        self.bar.total = total  # a phase starts as 0/1 (below) until its first real step says how many
        self.bar.n = done
        if status:
            self.bar.set_postfix_str(status, refresh=False)
        self.bar.refresh()

    def start(self, phase: str):
        """A phase began: shown at once, also those that report no steps (ceilings, load)."""
        self.update(phase, 0, 1)

    def end(self, phase: str, status: str):
        """The phase ended with status (ok | oom | error | timeout | crash | interrupted): its bar to 100% when
        ok, else left at what it counted, saying how it ended."""
        if self.enabled and self.last is not None and self.last[0] == phase:
            _, done, total, unit = self.last
            if status == "ok":
                self.update(phase, total, total, unit)
            else:
                self.update(phase, done, total, unit, status)
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None

    def finish(self):
        """The one line a notebook keeps: how far the last phase with progress got."""
        self.close()
        if self.enabled and self.in_kernel and self.last is not None:
            phase, done, total, _ = self.last
            print(shown(f"progress: {phase} {done}/{total}"))


def run_probe(params: Params, out_root="outputs", run_dir=None, progress: bool = True) -> Path:
    """Run the probe described by validated params; write and return its record directory. tp > 1: one worker
    per rank (greta.probe.ranks), each rank's VRAM sampled on its own device (RSS of its process on the CPU)."""
    rec = record.Record.create(params, out_root=out_root, run_dir=run_dir)
    workers = Workers.start(params, kind_of(params).job())
    rec.meta["worker_pid"] = workers.pids[0]
    if workers.world > 1:
        rec.meta["worker_pids"] = workers.pids
    rec.write_json("metadata.json", rec.meta)
    samplers = _start_samplers(params, workers)
    bars = _Bars(progress)
    perf = {ph: {"status": "not_run"} for ph in PHASES}
    results: dict = {}
    failure, interrupted, phase = None, None, PHASES[0]
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_term) if main_thread else None
    try:
        for phase in PHASES:
            failure, interrupted = _run_phase(phase, params, workers, samplers, bars, rec, perf, results)
            if failure is not None:
                break
    except KeyboardInterrupt as e:  # between phases
        interrupted, payload = _interrupted(e, phase)
        failure = (FAIL["interrupted"], phase, payload)
        if perf[phase]["status"] == "running":
            perf[phase]["status"] = "interrupted"
    finally:
        bars.finish()
        for s in samplers:
            s.set_phase(None)
            s.stop()
        workers.stop(graceful=failure is None and interrupted is None)
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
        try:
            _finish(rec, params, perf, results, samplers[0], failure, rank_samplers=samplers)
        except OSError as e:  # e.g. the disk filled up: no manifest.json, so the record is not complete
            raise record.RecordError(f"could not finish the record in {rec.path} ({e.strerror or e}); it has no "
                                     "manifest.json, so it does not pass as complete: free space and rerun") from None
    if interrupted:
        raise ProbeInterrupted(rec.path, interrupted)
    return rec.path


def _start_samplers(params, workers) -> list:
    """One VRAM sampler per rank: its device's NVML/amdsmi figures (RSS of its process on the CPU) and its
    allocator's; rank 0's is the record's vram_samples.csv, as with one worker."""
    samplers = []
    for r, (device, pid) in enumerate(zip(workers.devices, workers.pids)):
        backend, reason = vram.pick_backend(device, pid)
        backend.fallback_reason = reason
        samplers.append(vram.VramSampler(backend, period_s=params.sampling_period_s,
                                         alloc_source=workers.allocator_source(r)))
    for s in samplers:
        s.start()
    return samplers


def _run_phase(phase, params, workers, samplers, bars, rec, perf, results):
    """One phase on every rank, its perf entry and result filled in. -> (failure or None, interrupted or None)."""
    timeout = params.timeouts.for_phase(phase)
    for s in samplers:
        s.set_phase(phase)
    perf[phase] = {"status": "running", "timeout_s": timeout}
    _checkpoint(rec, perf, samplers[0])  # what a dead parent (e.g. a notebook kernel) leaves behind
    bars.start(phase)
    t0 = time.monotonic()
    interrupted, ranks = None, None
    try:
        status, payload, ranks = workers.run_phase(phase, timeout, bars)
    except KeyboardInterrupt as e:
        workers.kill()
        interrupted, payload = _interrupted(e, phase)
        status = "interrupted"
    bars.end(phase, status)
    perf[phase] = {"status": status, "timeout_s": timeout, "runner_wall_s": time.monotonic() - t0}
    if status != "ok":
        perf[phase].update({k: v for k, v in payload.items() if k != "traceback"})
        return (FAIL[status], phase, payload), interrupted
    perf[phase]["wall_s"] = payload.pop("wall_s")
    perf[phase]["max_rss_mb"] = payload.pop("max_rss_mb", None)
    if "allocator" in payload:
        perf[phase]["allocator"] = payload.pop("allocator")
    if ranks is not None:
        perf[phase]["ranks"] = ranks
    results[phase] = payload
    return None, None


def finish_from_checkpoint(run_dir, params: Params, status: str, how: str) -> Path:
    """Complete the record of a probe whose process died before finishing it (a dead notebook kernel, an audit
    interrupted while the kernel was being torn down) with the probe kind's own finisher (_finish): the phases
    and VRAM samples checkpointed up to then, the phase it was in marked with status ("crash": FAIL_ERROR,
    "interrupted": INTERRUPTED) and a reason saying how. Creates the record first if the probe never did."""
    import json

    run_dir = Path(run_dir)
    if (run_dir / "params.json").is_file():
        rec = record.Record(run_dir, params)
        meta_path = run_dir / "metadata.json"
        rec.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {
            "run_id": run_dir.name, "probe": params.probe, **record.git_state(), "versions": record.versions(),
            "seed": params.seed, "model": params.model, "statements": record.STATEMENTS_FORMAT}
    else:
        rec = record.Record.create(params, run_dir=run_dir)
    perf_path = run_dir / "perf.json"
    saved = json.loads(perf_path.read_text()) if perf_path.is_file() else {}
    perf = {ph: saved.get(ph, {"status": "not_run"}) for ph in PHASES}
    running = [ph for ph in PHASES if perf[ph].get("status") == "running"]
    # before the probe started, the fault is charged to its first phase, which never ran: say so
    failed, reason = (running[0], how) if running else (PHASES[0], f"{how} before the probe started")
    perf[failed].update({"status": status, "error": reason})
    csv_path = run_dir / "vram_samples.csv"
    samples = read_samples_csv(csv_path) if csv_path.is_file() else []
    sampler = vram.VramSampler(_CheckpointBackend(), period_s=params.sampling_period_s)
    sampler.samples = samples
    failure = (FAIL[status], failed, {"error": reason})
    _finish(rec, params, perf, {}, sampler, failure)
    return run_dir


class _CheckpointBackend:
    """The VRAM backend of a record finished from its checkpoint: the sampler that measured is gone."""
    name = "checkpoint"
    device_info = None
    fallback_reason = "the probe process died before writing vram.json; figures from its checkpointed samples"


def _checkpoint(rec, perf, sampler):
    """perf.json and the VRAM samples so far. Only a finished run gets verdict.json and manifest.json."""
    rec.write_json("perf.json", perf)
    write_samples_csv(rec.path / "vram_samples.csv", sampler.snapshot())


def vram_summary_of(params, perf, results, sampler, rank_samplers=None) -> dict:
    """The VRAM summary of a run: its samples and allocator peaks against the weights + KV floor (per rank
    under tp); with more than one rank, "ranks" holds each rank's figures against that same per-rank floor,
    and the top level stays rank 0's, as a one-worker record has it."""
    cfg = results.get("load", {}).get("config")
    allocator = {ph: perf[ph]["allocator"] for ph in PHASES if "allocator" in perf[ph]}
    model_cfg = ModelConfig(**cfg) if cfg else load_config(params.model)
    floor, loaded = floor_for(params, model_cfg), perf["load"].get("status") == "ok"
    out = vram.summarize(sampler, allocator, floor, loaded=loaded)
    if rank_samplers and len(rank_samplers) > 1:
        out["ranks"] = [rank_vram(r, s, _rank_allocator(perf, r), floor, loaded) for r, s in enumerate(rank_samplers)]
    return out


def _rank_allocator(perf, r: int) -> dict:
    """Rank r's allocator peaks by phase (perf.json's per-rank figures of each finished phase)."""
    return {ph: x["allocator"] for ph in PHASES for x in perf[ph].get("ranks", ()) if x["rank"] == r and "allocator" in x}


def rank_vram(r: int, sampler, allocator: dict, floor: dict, loaded: bool) -> dict:
    """One rank's entry of vram.json "ranks": its sampled peak and allocator peaks against the per-rank floor."""
    full = vram.summarize(sampler, allocator, floor, loaded=loaded)
    keep = ("backend", "fallback_reason", "device_info", "samples_count", "peak_vram_mb", "peak_timestamp_offset_sec",
            "allocator_peaks", "floor_applies", "below_floor", "below_floor_figures")
    return {"rank": r, **{k: full[k] for k in keep}}


def _finish(rec, params, perf, results, sampler, failure, rank_samplers=None):
    """The VRAM summary (and each rank's samples under tp), then the kind's finisher: metrics, verdict,
    throughput and report, everything measured up to any fault."""
    vram_summary = vram_summary_of(params, perf, results, sampler, rank_samplers)
    if "ranks" in vram_summary:
        write_rank_samples_csv(rec.path / RANK_SAMPLES_CSV, [s.samples for s in rank_samplers])
    kind_of(params).finish(rec, params, perf, results, vram_summary, sampler, failure)
