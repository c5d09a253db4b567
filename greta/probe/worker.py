"""The probe's worker process: holds the model and runs one phase per request.

It lives in its own process so the runner can kill it when a phase hangs inside a kernel, and so an OOM
or a crash leaves the runner (and the notebook kernel) alive to write the record.
Messages to the runner: ("progress", phase, done, total, unit), ("done", phase, result),
("oom" | "error", phase, info).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

import numpy as np
import torch

MB = 2**20
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


# What a collective says when the fault is a peer's: it timed out waiting for it, or the peer (having given up
# itself) closed the connection (gloo: "Connection closed by peer", "Connection reset by peer", a broken pipe)
PEER_CAUSED = ("timed out", "timeout", "closed by peer", "reset by peer", "broken pipe")


def is_collective_timeout(e: BaseException) -> bool:
    """A torch.distributed collective that gave up waiting for a peer (gloo: "Timed out waiting ...", NCCL's
    watchdog: "... timeout ...") or lost it (a peer that gave up first closed the connection): the cause is
    a peer that hung or died, not this rank."""
    import torch.distributed as dist

    msg = str(e).lower()
    backend_error = isinstance(e, getattr(dist, "DistBackendError", ())) or "gloo" in msg or "nccl" in msg
    return backend_error and any(k in msg for k in PEER_CAUSED)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


def memory_figures(device: torch.device) -> dict:
    """Memory state now, for OOM records."""
    import psutil

    out = {"rss_mb": psutil.Process().memory_info().rss / MB, "host_available_mb": psutil.virtual_memory().available / MB}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out.update(allocated_mb=torch.cuda.memory_allocated(device) / MB,
                   reserved_mb=torch.cuda.memory_reserved(device) / MB,
                   max_allocated_mb=torch.cuda.max_memory_allocated(device) / MB,
                   device_free_mb=free / MB, device_total_mb=total / MB)
    return out


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device: torch.device, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _matmul_s(n: int, device, dtype, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _median_s(lambda: a @ b, device, reps)


def _copy_s(nbytes: int, device, reps: int) -> float:
    src = torch.randint(0, 255, (nbytes,), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return _median_s(lambda: dst.copy_(src), device, reps)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """Matmul rate (n^3 product in dtype, random data) and device copy bandwidth (bytes read + written)."""
    gpu = device.type == "cuda"
    n, nbytes, reps = (8192, 1 << 30, 10) if gpu else (1024, 1 << 28, 3)
    t_mm = _matmul_s(n, device, dtype, reps)
    t_cp = _copy_s(nbytes, device, reps)
    if gpu:
        torch.cuda.empty_cache()  # the buffers are gone; give their memory back before the model loads
    return {"matmul_tflops": 2 * n**3 / t_mm / 1e12, "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_gbps": 2 * nbytes / t_cp / 1e9, "copy_bytes": nbytes,
            "method": f"median of {reps} after 2 warm-ups; copy counts bytes read + written"}


def inject(fault: str, phase: str, device: torch.device, rank: int = 0, tp: int = 1):
    """Fault injection for tests of the runner: real hangs, real allocator failures, real crashes. A fault
    without @rank strikes every rank (tp=1: the one worker); with @rank only that rank."""
    from greta.record.params import parse_fault

    spec = parse_fault(fault, tp)
    if spec is None or spec[1] != phase or spec[2] not in (None, rank):
        return
    kind = spec[0]
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "oom":
        torch.empty(1 << 60, dtype=torch.uint8, device=device)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "kernel_death":  # the process that runs the probe (e.g. a notebook kernel) dies
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(3600)  # the parent-death signal below ends this worker
    if kind == "error":
        raise RuntimeError(f"injected fault in phase {phase}")


def collective_timeout_s(p) -> float:
    """The collectives' own timeout under tensor parallelism: below every phase timeout from load on (the
    phases that run collectives), so a rank stuck in a collective gives up before its phase is killed."""
    from greta.record.params import PHASES

    return 0.9 * min(p.timeouts.for_phase(ph) for ph in PHASES[1:])


def logits_digest(*arrays: np.ndarray) -> str:
    """sha256 of logits arrays (their bytes, in order): every rank's must be rank 0's."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cap_memory(device: torch.device, fraction: float) -> None:
    """memory_fraction < 1: a real out-of-memory on purpose. On CUDA the caching allocator is capped at fraction
    of the card; on the CPU the worker's data segment (RLIMIT_DATA: its heap and private anonymous mappings,
    where torch's CPU allocator and numpy get their memory) at fraction of the host's RAM, so an allocation past
    it fails in the allocator ("can't allocate memory"), as the GPU's does."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return
    import resource

    import psutil

    cap, hard = int(fraction * psutil.virtual_memory().total), resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


class ProbeJob:
    """What every probe kind's job holds from phase to phase (its device, dtype, rank; progress to the
    runner) and the phases they share (ceilings). A kind's job (greta.probe.kinds: its job()) adds load,
    prefill, decode and reference."""

    def __init__(self, params, send):
        self.p, self.send = params, send
        # tensor parallel: this process is one rank (greta.probe.ranks set torchrun's environment), on cuda:LOCAL_RANK
        self.rank = int(os.environ.get("RANK", 0)) if params.tp > 1 else 0
        self.device = torch.device(params.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if params.tp > 1 else 0)
        self.tp = None
        self.dtype = DTYPES[params.dtype]
        self._last = 0.0
        if params.threads:
            torch.set_num_threads(params.threads)
        if params.memory_fraction < 1.0:
            cap_memory(self.device, params.memory_fraction)

    def progress(self, phase: str, done: int, total: int, unit: str):
        """done of total units (what a phase counts: "pos" of a prefill, "tok" of decode...) of phase."""
        now = time.monotonic()
        if done == total or now - self._last > 0.25:
            self._last = now
            self.send(("progress", phase, done, total, unit))

    def close(self):
        """Leave the tensor-parallel group (the runner kills a rank that hangs here: the issue's scout saw
        destroy_process_group hang)."""
        if self.tp is not None:
            from greta.engine.launch import finish

            finish()

    def ceilings(self) -> dict:
        return measure_ceilings(self.device, self.dtype)

    def loaded_figures(self, source: str, model_hash: str, weight_bytes: int, prompt_info: dict) -> dict:
        """The load phase's figures for the record, whichever kind and engine hold the model (self.cfg, and
        self.model with its KV cache, set by the kind's load)."""
        cfg = self.cfg
        return {"config": cfg.to_dict(), "weights_source": source, "model_hash": model_hash,
                "param_count": cfg.param_count(), "weights_mb": weight_bytes / MB,
                "kv_cache_mb": self.model.cache.nbytes() / MB, "kv_cache_capacity": self.model.cache.capacity,
                "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "torch_threads": torch.get_num_threads(), "prompt": prompt_info}

    def load_weights(self):
        """The model this process runs -> (config, weights, source, hash). Tensor parallel (tp > 1): join the
        group from torchrun's environment (the collectives' timeout below the phases') and make or load only
        this rank's shard."""
        from greta.engine.launch import init_from_env
        from greta.engine.source import load_model

        p, shard = self.p, None
        if p.tp > 1:
            # the exact reduction (kv_aligned=1): on CUDA the one-shot over symmetric memory (graph-capturable,
            # the same bits as rank order), elsewhere all_gather + rank-order add (docs/TP.md)
            exact = "one_shot" if self.device.type == "cuda" else "rank_order"
            self.tp, _ = init_from_env(self.device.type, collective_timeout_s(p), exact=exact)
            shard = (self.tp.rank, self.tp.world)
        m = load_model(p.model, p.seed, self.dtype, self.device, shard=shard)
        return m.config, m.weights, m.source, m.model_hash


def _allocator_stats(stats, device: torch.device, stop: threading.Event):
    while not stop.wait(0.1):
        stats[0] = torch.cuda.memory_allocated(device) / MB
        stats[1] = torch.cuda.memory_reserved(device) / MB


def _max_rss_mb() -> float | None:
    """This worker's peak resident memory so far (exact, unlike the sampled RSS)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


def _die_with_parent():
    """Linux: SIGKILL this worker when its parent dies (no orphan holding the GPU after a dead kernel)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def main(params, conn, stats, job_class):
    """Entry point of the worker process (multiprocessing, spawn); job_class holds the probe's phases (a
    ProbeJob: the job of params' probe kind, greta.probe.kinds)."""
    _die_with_parent()
    try:
        job = job_class(params, conn.send)
        if job.device.type == "cuda":
            torch.cuda.set_device(job.device)
    except BaseException as e:  # noqa: BLE001 - reported as the first phase's error
        conn.send(("error", "setup", {"error": one_line(e), "traceback": traceback.format_exc()[-4000:]}))
        return
    stop = threading.Event()
    if job.device.type == "cuda":
        threading.Thread(target=_allocator_stats, args=(stats, job.device, stop), daemon=True).start()
    while True:
        try:
            phase = conn.recv()
        except (EOFError, OSError):  # the runner is gone
            break
        if phase == "exit":
            break
        try:
            if job.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(job.device)
            inject(params.fault, phase, job.device, job.rank, params.tp)
            t0 = time.perf_counter()
            result = getattr(job, phase)()
            sync(job.device)
            result["wall_s"] = time.perf_counter() - t0
            result["max_rss_mb"] = _max_rss_mb()
            if job.device.type == "cuda":
                result["allocator"] = {"max_allocated_mb": torch.cuda.max_memory_allocated(job.device) / MB,
                                       "max_reserved_mb": torch.cuda.max_memory_reserved(job.device) / MB}
            conn.send(("done", phase, result))
        except BaseException as e:  # noqa: BLE001 - everything is reported, nothing is lost
            kind = "oom" if is_oom(e) else "error"
            info = {"error": one_line(e), "traceback": traceback.format_exc()[-4000:]}
            if is_collective_timeout(e):  # the runner looks for the peer that never came (greta.probe.ranks)
                info["collective_timeout"] = True
            try:
                info["memory"] = memory_figures(job.device)
            except Exception:  # noqa: BLE001
                pass
            conn.send((kind, phase, info))
    stop.set()
    job.close()
