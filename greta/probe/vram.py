"""Background VRAM sampler with automatic backends. What it writes (vram_samples.csv, vram.json and the
weights + KV floor) is greta.record.samples'.

Backends (pick_backend chooses one; every backend has name, device_info, used_mb(), close()):
  amdsmi      ROCm: device-wide VRAM used, from AMD SMI
  nvml        CUDA: device-wide memory used, from NVML (package nvidia-ml-py)
  torch_cuda  fallback when the vendor library is missing: total - free from torch.cuda.mem_get_info
  rss         CPU (or last resort): RSS of the worker process plus its children

Device-wide figures (amdsmi, nvml, torch_cuda) include other processes on the same GPU.
MB = 2**20 bytes throughout.
"""
from __future__ import annotations

import os
import platform
import threading
import time

from greta.record.samples import MB, summary


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def physical_index(index: int, visible: str | None) -> int:
    """Map a torch device index to the physical one through a *_VISIBLE_DEVICES list of integers.
    UUIDs, MIG ids or an out-of-range index leave the index unchanged."""
    if not visible:
        return index
    items = [s.strip() for s in visible.split(",") if s.strip()]
    if index < len(items) and all(s.isdigit() for s in items):
        return int(items[index])
    return index


# --- backends ----------------------------------------------------------------

class AmdSmiBackend:
    name = "amdsmi"
    fallback_reason = None

    def __init__(self, index: int = 0):
        import amdsmi

        self._smi = amdsmi
        amdsmi.amdsmi_init()
        try:
            handles = amdsmi.amdsmi_get_processor_handles()
            # HIP honours HIP_VISIBLE_DEVICES, else CUDA_VISIBLE_DEVICES; AMD SMI lists every card.
            visible = os.environ.get("HIP_VISIBLE_DEVICES") or os.environ.get("CUDA_VISIBLE_DEVICES")
            self._handle = handles[physical_index(index, visible)]
            self.device_info = str(amdsmi.amdsmi_get_gpu_asic_info(self._handle)["market_name"])
        except BaseException:
            amdsmi.amdsmi_shut_down()
            raise

    def used_mb(self) -> float:
        return float(self._smi.amdsmi_get_gpu_vram_usage(self._handle)["vram_used"])  # already MB

    def close(self):
        self._smi.amdsmi_shut_down()


class NvmlBackend:
    name = "nvml"
    fallback_reason = None

    def __init__(self, index: int = 0):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            # NVML counts in PCI bus order; CUDA does too only with CUDA_DEVICE_ORDER=PCI_BUS_ID.
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(physical_index(index, os.environ.get("CUDA_VISIBLE_DEVICES")))
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.device_info = name.decode() if isinstance(name, bytes) else str(name)
        except BaseException:
            pynvml.nvmlShutdown()
            raise

    def used_mb(self) -> float:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / MB

    def close(self):
        self._nvml.nvmlShutdown()


class TorchCudaBackend:
    """Fallback only: the first call creates a CUDA context (~300-500 MB) in the calling process,
    so from a parent process it both costs memory and shows up in the figures."""
    name = "torch_cuda"
    fallback_reason = None

    def __init__(self, index: int = 0):
        import torch

        self._cuda = torch.cuda
        self._index = index
        self.used_mb()  # raises here when CUDA is unavailable
        self.device_info = str(torch.cuda.get_device_name(index))

    def used_mb(self) -> float:
        free, total = self._cuda.mem_get_info(self._index)
        return (total - free) / MB

    def close(self):
        pass


class RssBackend:
    name = "rss"
    fallback_reason = None

    def __init__(self, pid: int):
        import psutil

        self._proc = psutil.Process(pid)
        cpu = platform.processor() or platform.machine()
        self.device_info = f"CPU ({cpu}, {os.cpu_count()} cores) RSS of pid {pid}"

    def used_mb(self) -> float:
        import psutil

        # Raises if the process is gone. An exited but unreaped worker (zombie) reads as RSS 0: gone too.
        if self._proc.status() == psutil.STATUS_ZOMBIE:
            raise psutil.ZombieProcess(self._proc.pid)
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # a child exited meanwhile
                pass
        return total / MB

    def close(self):
        pass


def pick_backend(device: str, pid: int, is_hip: bool | None = None):
    """(backend, fallback_reason or None) for "cpu", "cuda" or "cuda:N".

    CUDA: NVML, then torch.cuda, then RSS. ROCm: amdsmi, then torch.cuda, then RSS
    (NVML is never tried on ROCm: it can only see NVIDIA cards). Never raises for a missing library."""
    if device == "cpu":
        return RssBackend(pid), None
    if device != "cuda" and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r} is not cpu, cuda or cuda:N")
    index = int(device.partition(":")[2] or 0)
    if is_hip is None:
        import torch

        is_hip = torch.version.hip is not None
    vendor = (AmdSmiBackend, "amdsmi") if is_hip else (NvmlBackend, "pynvml")
    failures = []
    for cls, label in [vendor, (TorchCudaBackend, "torch.cuda")]:
        try:
            backend = cls(index)
        except ImportError as e:
            failures.append(f"{label} not importable: {_one_line(e)}")
            continue
        except Exception as e:
            failures.append(f"{label} failed: {type(e).__name__}: {_one_line(e)}")
            continue
        reason = "; ".join(failures) or None
        backend.fallback_reason = reason
        return backend, reason
    backend = RssBackend(pid)
    backend.fallback_reason = "; ".join(failures) + "; using process RSS"
    return backend, backend.fallback_reason


# --- sampler -----------------------------------------------------------------

class VramSampler:
    """Samples backend.used_mb() (and alloc_source, if given) on a daemon thread every period_s.

    alloc_source: optional callable returning (allocated_mb, reserved_mb) or None, e.g. reading a
    multiprocessing.Array that the worker fills with torch.cuda.memory_allocated/reserved.
    Times (t_s, start_s, end_s) are seconds since start()."""

    def __init__(self, backend, period_s: float = 1.0, alloc_source=None, clock=time.monotonic):
        self.backend = backend
        self.period_s = period_s
        self.alloc_source = alloc_source
        self.clock = clock
        self.samples: list[dict] = []
        self.phases: list[dict] = []
        self.skipped = 0  # samples that raised
        self.last_error: str | None = None
        self._phase: str | None = None
        self._t0: float | None = None
        self._lock = threading.RLock()  # set_phase/stop sample while holding it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def _now(self) -> float:
        return self.clock() - self._t0

    def _sample(self, t: float | None = None):
        with self._lock:
            try:
                used = self.backend.used_mb()
                alloc = self.alloc_source() if self.alloc_source else None
            except Exception as e:  # e.g. the worker died: skip this sample
                self.skipped += 1
                self.last_error = f"{type(e).__name__}: {_one_line(e)}"
                return
            allocated, reserved = alloc if alloc is not None else (None, None)
            t = self._now() if t is None else t
            self.samples.append({"t_s": t, "phase": self._phase, "device_used_mb": used,
                                 "allocated_mb": allocated, "reserved_mb": reserved})

    def _loop(self):
        while not self._stop.wait(self.period_s):
            self._sample()

    def snapshot(self) -> list[dict]:
        """The samples so far (a copy, taken under the lock)."""
        with self._lock:
            return list(self.samples)

    def start(self):
        if self._t0 is not None:
            raise RuntimeError("VramSampler already started")
        self._t0 = self.clock()
        self._sample(0.0)
        self._thread = threading.Thread(target=self._loop, name="vram-sampler", daemon=True)
        self._thread.start()

    def _end_phase(self, t: float):
        if self.phases and self.phases[-1]["end_s"] is None:
            self.phases[-1]["end_s"] = t

    def set_phase(self, name: str | None):
        """Tag following samples with name (None: between phases) and take one sample now."""
        if self._t0 is None:
            raise RuntimeError("call start() before set_phase()")
        if name == self._phase or self._stopped:
            return
        with self._lock:
            now = self._now()
            self._end_phase(now)
            if name is not None:
                self.phases.append({"name": name, "start_s": now, "end_s": None})
            self._phase = name
            self._sample(now)  # every phase gets at least one sample, at its start

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._t0 is not None:
            with self._lock:
                now = self._now()
                self._sample(now)
                self._end_phase(now)
        self.backend.close()


# --- the record's side: greta.record.samples holds the CSV, the vram.json summary and the floor -----

def summarize(sampler: VramSampler, allocator_peaks: dict, floor: dict, loaded: bool = True) -> dict:
    """The vram.json dict of a sampler's run (docs/RECORD.md); see summary()."""
    return summary(sampler.samples, allocator_peaks, floor, loaded=loaded, backend=sampler.backend.name,
                   fallback_reason=getattr(sampler.backend, "fallback_reason", None),
                   device_info=sampler.backend.device_info, period_s=sampler.period_s, phases=sampler.phases)


__all__ = [
    "AmdSmiBackend", "NvmlBackend", "TorchCudaBackend", "RssBackend", "pick_backend", "physical_index",
    "VramSampler", "summarize",
]
