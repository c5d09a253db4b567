"""Soak: the tiny probe 20 times in one process, and 20 times in separate processes. Memory does not
grow from run to run: neither the runner's RSS nor the worker's exact peak RSS (perf.json max_rss_mb)."""
from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from greta.probe.runner import run_probe

from conftest import CPU_PARAMS, SMALL_PROBE

N = 20
MB = 2**20
pytestmark = pytest.mark.slow


def worker_peaks(dirs) -> list[float]:
    perfs = [json.loads((Path(d) / "perf.json").read_text()) for d in dirs]
    return [max(p[ph]["max_rss_mb"] for ph in ("ceilings", "load", "prefill", "decode", "reference")) for p in perfs]


def assert_flat(xs: list[float], what: str, slack_mb: float):
    """No trend after the first runs (warm-up: imports, allocator pools): the last five are not above
    the five after warm-up by more than slack_mb."""
    early, late = statistics.median(xs[3:8]), statistics.median(xs[-5:])
    assert late - early < slack_mb, f"{what} grew {late - early:.1f} MB over {len(xs)} runs: {[round(x) for x in xs]}"


def test_soak_in_one_process(small_params, tmp_path):
    me = psutil.Process()
    rss, dirs = [], []
    for _ in range(N):
        d = run_probe(small_params(), out_root=tmp_path, progress=False)
        gc.collect()
        rss.append(me.memory_info().rss / MB)
        dirs.append(d)
        assert json.loads((Path(d) / "verdict.json").read_text())["verdict"] == "PASS_EQUIV"
    assert_flat(rss, "runner RSS", 8)
    assert_flat(worker_peaks(dirs), "worker peak RSS", 8)
    assert [c for c in me.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())
            and "resource_tracker" not in " ".join(c.cmdline())] == []


RUN_ONE = """
import resource, sys
from greta.record.params import load_params
from greta.probe.runner import run_probe
params = load_params(sys.argv[1], {k: v for k, v in (a.split("=", 1) for a in sys.argv[3:])})
d = run_probe(params, out_root=sys.argv[2], progress=False)
print(d, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_soak_in_separate_processes(tmp_path):
    args = [f"{k}={v}" for k, v in SMALL_PROBE.items()]
    peaks, dirs = [], []
    for _ in range(N):
        out = subprocess.run([sys.executable, "-c", RUN_ONE, str(CPU_PARAMS), str(tmp_path), *args],
                             capture_output=True, text=True, check=True).stdout.split()
        dirs.append(out[-2])
        peaks.append(float(out[-1]))
        assert json.loads((Path(out[-2]) / "verdict.json").read_text())["verdict"] == "PASS_EQUIV"
    assert len(set(dirs)) == N  # twenty records, none overwritten
    assert_flat(peaks, "runner peak RSS", 8)
    assert_flat(worker_peaks(dirs), "worker peak RSS", 8)
