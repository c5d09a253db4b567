"""A real out-of-memory on the CPU (memory_fraction < 1 caps the worker's data segment, RLIMIT_DATA, at that
fraction of the host's RAM): the allocator itself refuses, no fault injected, as memory_fraction makes the
GPU's allocator refuse. The cap is set 512 MiB above the data segment of a fresh interpreter that imported what
the worker imports, below what the qwen2-0.5b preset's weights alone need (942 MiB in bf16), so on any
machine the load phase fails in the allocator: FAIL_OOM naming it, a complete record that verifies, no worker
left. Control: under the same cap the tiny preset (2 MiB of weights) runs to PASS_EQUIV, so the cap alone is not
what fails."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from greta.checks.verify import verify
from greta.probe.preflight import preflight
from greta.probe.runner import run_probe
from greta.record.params import load_params
from tests.test_probe import spawned_children

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA is Linux's")
RUN = {"model": "qwen2-0.5b", "ctx": 64, "gen": 4, "span": 2, "prefill_chunk": 32, "kv_block": 64,
       "sampling_period_s": 0.2, "threads": 1, "timeouts.load": 120}


def _fresh_data_bytes() -> int:
    """The data segment of a fresh interpreter that imported what a probe worker imports (this test process's
    own would not do: an xdist worker that ran other tests holds far more)."""
    code = ("import re, torch, greta.probe.worker, greta.engine.runner\n"
            "torch.ones(256, 256) @ torch.ones(256, 256)\n"
            "print(re.search(r'VmData:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return int(out.stdout.split()[-1]) * 1024


def _run(tmp_path: Path, **over) -> Path:
    params = preflight(load_params("params/cpu_default.yaml", {**RUN, **over}))
    return Path(run_probe(params, out_root=tmp_path, progress=False))


def test_a_capped_cpu_worker_runs_out_of_memory_for_real(tmp_path):
    fraction = (_fresh_data_bytes() + 512 * 2**20) / psutil.virtual_memory().total
    d = _run(tmp_path, memory_fraction=round(fraction, 6))
    v = json.loads((d / "verdict.json").read_text())
    assert v["verdict"] == "FAIL_OOM" and v["failed_phase"] == "load", v
    assert "can't allocate memory" in v["reason"] or "MemoryError" in v["reason"], v
    assert "injected" not in v["reason"].lower()  # the allocator's refusal, not an injected one
    assert json.loads((d / "params.json").read_text())["fault"] == "none"
    assert verify(d) == []
    assert not spawned_children()
    control = _run(tmp_path, model="tiny", memory_fraction=round(fraction, 6))
    assert json.loads((control / "verdict.json").read_text())["verdict"] == "PASS_EQUIV"
