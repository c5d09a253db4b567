"""greta.probe.vram: backends with fake vendor modules, fallbacks, the sampler, artifacts. No GPU needed."""
import json
import os
import subprocess
import sys
import time
import types

import psutil
import pytest

from greta.engine.config import PRESETS
from greta.probe.vram import (
    AmdSmiBackend, NvmlBackend, RssBackend, TorchCudaBackend, VramSampler, physical_index, pick_backend, summarize,
)
from greta.record.samples import floor_mb, read_samples_csv, write_samples_csv

MB = 2**20


# --- fake vendor libraries ---------------------------------------------------

def fake_amdsmi(used_mb=(1000, 2000), names=("AMD Instinct MI300X", "AMD Instinct MI250")):
    m = types.ModuleType("amdsmi")
    m.calls = []
    m.amdsmi_init = lambda *a: m.calls.append("init")
    m.amdsmi_shut_down = lambda: m.calls.append("shut_down")
    m.amdsmi_get_processor_handles = lambda: [f"h{i}" for i in range(len(used_mb))]
    m.amdsmi_get_gpu_vram_usage = lambda h: {"vram_total": 196592, "vram_used": used_mb[int(h[1:])]}
    m.amdsmi_get_gpu_asic_info = lambda h: {"market_name": names[int(h[1:])], "vendor_id": "0x1002"}
    return m


def fake_pynvml(used_bytes=(1 * MB, 3 * MB, 5 * MB), name_type=bytes, init_error=None):
    m = types.ModuleType("pynvml")
    m.calls = []

    class NVMLError(Exception):
        pass

    class Memory:
        def __init__(self, used):
            self.total, self.used, self.free = 80 * 2**30, used, 80 * 2**30 - used

    def init():
        m.calls.append("init")
        if init_error:
            raise NVMLError(init_error)

    def by_index(i):
        if i >= len(used_bytes):
            raise NVMLError("Invalid Argument")
        return ("handle", i)

    def name(h):
        s = f"NVIDIA H100 80GB HBM3 #{h[1]}"
        return s.encode() if name_type is bytes else s

    m.NVMLError = NVMLError
    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: len(used_bytes)
    m.nvmlDeviceGetHandleByIndex = by_index
    m.nvmlDeviceGetMemoryInfo = lambda h: Memory(used_bytes[h[1]])
    m.nvmlDeviceGetName = name
    return m


@pytest.fixture
def no_visible(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)


# --- backends ----------------------------------------------------------------

def test_physical_index():
    assert physical_index(0, None) == 0
    assert physical_index(1, "") == 1
    assert physical_index(0, "2,0") == 2
    assert physical_index(1, " 2, 0 ") == 0
    assert physical_index(0, "GPU-1a2b3c") == 0  # UUIDs: left unchanged
    assert physical_index(3, "1,2") == 3


def test_amdsmi_backend(monkeypatch, no_visible):
    smi = fake_amdsmi()
    monkeypatch.setitem(sys.modules, "amdsmi", smi)
    b = AmdSmiBackend(0)
    assert (b.name, b.device_info, b.used_mb()) == ("amdsmi", "AMD Instinct MI300X", 1000.0)
    b.close()
    assert smi.calls == ["init", "shut_down"]
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")
    b = AmdSmiBackend(0)
    assert (b.device_info, b.used_mb()) == ("AMD Instinct MI250", 2000.0)


@pytest.mark.parametrize("name_type", [bytes, str])
def test_nvml_backend(monkeypatch, no_visible, name_type):
    nvml = fake_pynvml(name_type=name_type)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    b = NvmlBackend(1)
    assert (b.name, b.device_info, b.used_mb()) == ("nvml", "NVIDIA H100 80GB HBM3 #1", 3.0)
    b.close()
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_index_through_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert NvmlBackend(0).used_mb() == 5.0
    assert NvmlBackend(1).used_mb() == 1.0


def test_nvml_shuts_down_when_handle_fails(monkeypatch, no_visible):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.raises(nvml.NVMLError):
        NvmlBackend(7)
    assert nvml.calls == ["init", "shutdown"]


def test_rss_backend_counts_children():
    b = RssBackend(os.getpid())
    assert b.name == "rss" and f"RSS of pid {os.getpid()}" in b.device_info and "cores" in b.device_info
    alone = b.used_mb()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        assert b.used_mb() > alone + 1  # a python child is several MB
    finally:
        child.kill()
        child.wait()


def test_rss_backend_dead_process_raises():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    b = RssBackend(child.pid)
    child.wait()
    with pytest.raises(psutil.Error):
        b.used_mb()


def test_rss_backend_zombie_raises():
    # An exited worker that is not reaped yet reads as RSS 0; it must not become a 0 MB sample.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    b = RssBackend(child.pid)
    deadline = time.time() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    try:
        with pytest.raises(psutil.Error):
            b.used_mb()
    finally:
        child.wait()


# --- pick_backend ------------------------------------------------------------

def test_pick_cpu():
    b, reason = pick_backend("cpu", os.getpid())
    assert isinstance(b, RssBackend) and reason is None and b.fallback_reason is None


def test_pick_nvml(monkeypatch, no_visible):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    b, reason = pick_backend("cuda:2", os.getpid(), is_hip=False)
    assert isinstance(b, NvmlBackend) and reason is None and b.used_mb() == 5.0


def test_pick_amdsmi(monkeypatch, no_visible):
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi())
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    b, reason = pick_backend("cuda", os.getpid(), is_hip=True)
    assert isinstance(b, AmdSmiBackend) and reason is None


def test_pick_nvml_missing_falls_to_rss(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    b, reason = pick_backend("cuda", os.getpid(), is_hip=False)  # CPU-only torch: torch.cuda fails too
    assert isinstance(b, RssBackend)
    assert reason.startswith("pynvml not importable:") and "torch.cuda failed:" in reason
    assert "\n" not in reason and b.fallback_reason == reason


def test_pick_nvml_init_error_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="Driver Not Loaded"))
    b, reason = pick_backend("cuda:0", os.getpid(), is_hip=False)
    assert isinstance(b, RssBackend) and "pynvml failed: NVMLError: Driver Not Loaded" in reason


def test_pick_hip_amdsmi_missing_never_tries_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    b, reason = pick_backend("cuda", os.getpid(), is_hip=True)
    assert isinstance(b, RssBackend) and nvml.calls == []
    assert reason.startswith("amdsmi not importable:") and "torch.cuda failed:" in reason


def test_pick_hip_falls_to_torch_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (60 * MB, 100 * MB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"AMD Radeon #{i}")
    b, reason = pick_backend("cuda:1", os.getpid(), is_hip=True)
    assert isinstance(b, TorchCudaBackend) and b.device_info == "AMD Radeon #1" and b.used_mb() == 40.0
    assert reason.startswith("amdsmi not importable:") and "torch" not in reason


def test_pick_default_is_hip_uses_torch_version(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    b, _ = pick_backend("cuda", os.getpid())
    assert isinstance(b, NvmlBackend)


def test_pick_bad_device():
    with pytest.raises(ValueError):
        pick_backend("mps", os.getpid())


# --- sampler -----------------------------------------------------------------

class FakeBackend:
    name, device_info, fallback_reason = "nvml", "Fake GPU", None

    def __init__(self, values=None, fail_on=()):
        self.values = values  # used_mb per call (last value repeats)
        self.fail_on = set(fail_on)
        self.calls = 0
        self.closed = 0

    def used_mb(self):
        self.calls += 1
        if self.calls in self.fail_on:
            raise ProcessLookupError("worker died")
        if self.values is None:
            return 100.0 * self.calls
        return self.values[min(self.calls, len(self.values)) - 1]

    def close(self):
        self.closed += 1


class FakeClock:
    def __init__(self, start=1000.0, step=0.5):
        self.t, self.step = start - step, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_sampler_phases_and_stop_idempotent():
    backend = FakeBackend()
    s = VramSampler(backend, period_s=3600, alloc_source=lambda: (10.0, 20.0), clock=FakeClock())
    s.start()
    for phase in ("load", "prefill", "decode"):
        s.set_phase(phase)
    s.set_phase("decode")  # no change: no sample
    s.stop()
    s.stop()
    assert backend.closed == 1
    assert [x["phase"] for x in s.samples] == [None, "load", "prefill", "decode", "decode"]
    assert all(x["allocated_mb"] == 10.0 and x["reserved_mb"] == 20.0 for x in s.samples)
    ts = [x["t_s"] for x in s.samples]
    assert ts[0] == 0.0 and ts == sorted(ts)
    assert [p["name"] for p in s.phases] == ["load", "prefill", "decode"]
    for a, b in zip(s.phases, s.phases[1:]):
        assert a["start_s"] <= a["end_s"] == b["start_s"]
    assert s.phases[-1]["end_s"] is not None
    for p in s.phases:
        assert any(x["phase"] == p["name"] and p["start_s"] <= x["t_s"] <= p["end_s"] for x in s.samples)


def test_sampler_thread_samples_and_stops_promptly():
    s = VramSampler(FakeBackend(), period_s=0.01)
    s.start()
    s.set_phase("prefill")
    deadline = time.monotonic() + 5
    while len(s.samples) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    t = time.monotonic()
    s.stop()
    assert time.monotonic() - t < 1 and not s._thread.is_alive()
    assert len(s.samples) >= 10
    assert s.samples[0]["allocated_mb"] is None and s.samples[0]["reserved_mb"] is None  # no alloc_source


def test_sampler_skips_raising_samples():
    backend = FakeBackend(fail_on={2, 3})
    s = VramSampler(backend, period_s=3600, clock=FakeClock())
    s.start()
    s.set_phase("load")  # call 2 raises
    s.set_phase("prefill")  # call 3 raises
    s.set_phase("decode")
    s.stop()
    assert [x["phase"] for x in s.samples] == [None, "decode", "decode"]
    assert s.skipped == 2 and "worker died" in s.last_error
    assert [p["name"] for p in s.phases] == ["load", "prefill", "decode"]


def test_sampler_alloc_source_none_and_phase_none():
    src = iter([None, (5.0, 6.0), (7.0, 8.0)])
    s = VramSampler(FakeBackend(), period_s=3600, alloc_source=lambda: next(src), clock=FakeClock())
    s.start()
    s.set_phase("prefill")
    s.set_phase(None)  # between phases
    assert [(x["phase"], x["allocated_mb"]) for x in s.samples] == [(None, None), ("prefill", 5.0), (None, 7.0)]
    assert s.phases[0]["end_s"] is not None
    s.stop()


def test_sampler_set_phase_before_start():
    with pytest.raises(RuntimeError):
        VramSampler(FakeBackend()).set_phase("load")


# --- summarize ----------------------------------------------------------------

FLOOR = {"weights_mb": 15316.0, "kv_cache_mb": 4104.0, "total_mb": 19420.0}


def run_sampler(values):
    s = VramSampler(FakeBackend(values=values), period_s=3600, clock=FakeClock(step=1.0))
    s.start()  # sample at t=0
    s.set_phase("load")  # phase start and sample at t=1
    s.set_phase("prefill")  # t=2
    s.set_phase("decode")  # t=3
    s.stop()  # last sample and decode's end at t=4
    return s


def test_summarize_above_floor():
    s = run_sampler([500.0, 16000.0, 21000.0, 20500.0, 20000.0])
    peaks = {"load": {"max_allocated_mb": 15400.0, "max_reserved_mb": 15500.0},
             "prefill": {"max_allocated_mb": 20000.0, "max_reserved_mb": 20800.0}}
    v = summarize(s, peaks, FLOOR)
    assert list(v) == ["backend", "fallback_reason", "device_info", "sampling_period_sec", "samples_count",
                       "peak_vram_mb", "peak_timestamp_offset_sec", "allocator_peaks", "floor", "floor_applies", "below_floor",
                       "below_floor_figures", "phases"]
    assert v["backend"] == "nvml" and v["device_info"] == "Fake GPU" and v["fallback_reason"] is None
    assert v["samples_count"] == 5 and v["sampling_period_sec"] == 3600
    assert v["peak_vram_mb"] == 21000.0 and v["peak_timestamp_offset_sec"] == 2.0
    assert v["below_floor"] is False and v["below_floor_figures"] == []
    assert v["allocator_peaks"] == peaks and v["floor"] == FLOOR
    assert v["phases"] == [{"name": "load", "start_s": 1.0, "end_s": 2.0},
                           {"name": "prefill", "start_s": 2.0, "end_s": 3.0},
                           {"name": "decode", "start_s": 3.0, "end_s": 4.0}]
    json.dumps(v)


def test_summarize_below_floor_flags_each_figure():
    s = run_sampler([500.0, 15000.0, 17095.0, 16000.0])
    peaks = {"load": {"max_allocated_mb": 100.0, "max_reserved_mb": 100.0},  # load is never compared
             "prefill": {"max_allocated_mb": 18000.0, "max_reserved_mb": 19000.0},
             "decode": {"max_allocated_mb": None, "max_reserved_mb": None}}
    v = summarize(s, peaks, FLOOR)
    assert v["below_floor"] is True
    assert v["below_floor_figures"] == ["peak_vram_mb 17095.0 < floor 19420.0",
                                        "prefill max_allocated_mb 18000.0 < floor 19420.0"]
    assert v["peak_timestamp_offset_sec"] == 2.0


def test_summarize_only_allocator_below():
    s = run_sampler([25000.0])
    v = summarize(s, {"decode": {"max_allocated_mb": 19000.0, "max_reserved_mb": 19500.0}}, FLOOR)
    assert v["below_floor_figures"] == ["decode max_allocated_mb 19000.0 < floor 19420.0"]


def test_summarize_no_samples():
    s = VramSampler(FakeBackend(fail_on=range(1, 100)), period_s=3600, clock=FakeClock())
    s.start()
    s.stop()
    v = summarize(s, {}, FLOOR)
    assert v["samples_count"] == 0 and v["peak_vram_mb"] is None and v["peak_timestamp_offset_sec"] is None
    assert v["below_floor"] is False


def test_summarize_reports_fallback_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    b, reason = pick_backend("cuda", os.getpid(), is_hip=False)
    s = VramSampler(b, period_s=3600)
    s.start()
    s.stop()
    v = summarize(s, {}, FLOOR)
    assert v["backend"] == "rss" and v["fallback_reason"] == reason and v["peak_vram_mb"] > 0


# --- artifacts -----------------------------------------------------------------

def test_csv_round_trip(tmp_path):
    samples = [
        {"t_s": 0.0, "phase": None, "device_used_mb": 512.04, "allocated_mb": None, "reserved_mb": None},
        {"t_s": 1.23456, "phase": "prefill", "device_used_mb": 20000.26, "allocated_mb": 19500.0, "reserved_mb": 19800.55},
    ]
    p = tmp_path / "vram_samples.csv"
    write_samples_csv(p, samples)
    lines = p.read_text().splitlines()
    assert lines == ["t_s,phase,device_used_mb,allocated_mb,reserved_mb",
                     "0.000,,512.0,,",
                     "1.235,prefill,20000.3,19500.0,19800.5"]
    assert read_samples_csv(p) == [
        {"t_s": 0.0, "phase": None, "device_used_mb": 512.0, "allocated_mb": None, "reserved_mb": None},
        {"t_s": 1.235, "phase": "prefill", "device_used_mb": 20000.3, "allocated_mb": 19500.0, "reserved_mb": 19800.5},
    ]


def test_csv_from_sampler(tmp_path):
    s = run_sampler([100.0, 200.0])
    write_samples_csv(tmp_path / "v.csv", s.samples)
    back = read_samples_csv(tmp_path / "v.csv")
    assert [r["phase"] for r in back] == [x["phase"] for x in s.samples]
    assert [r["device_used_mb"] for r in back] == [x["device_used_mb"] for x in s.samples]


def test_floor_mb():
    cfg = PRESETS["tiny"]
    f = floor_mb(cfg, 2, 32768)
    weights = cfg.param_count() * 2 / MB
    kv = 2 * 2 * 1 * 32 * 2 * 32768 / MB  # K and V, 2 layers, 1 kv head, head_dim 32, bf16
    assert f == {"weights_mb": round(weights, 1), "kv_cache_mb": round(kv, 1), "total_mb": round(weights + kv, 1)}
    f8b = floor_mb(PRESETS["llama3-8b"], 2, 32768)
    assert f8b["kv_cache_mb"] == 4096.0 and 15000 < f8b["weights_mb"] < 15400
