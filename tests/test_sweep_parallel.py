"""Parallel sweeps (greta sweep --gpus N, greta/sweeps/parallel.py) on the CPU, where the N "GPUs" are slots:
points run concurrently, each in its own process with its group in CUDA_VISIBLE_DEVICES and multicast off;
every record verifies, the results and the guardrail are a serial run's; an interrupted or killed sweep leaves
each running point an INTERRUPTED record and no process behind, and a resume completes it; bad --gpus values
are one line. The matrix: params/cpu_sweep.yaml at ctx {128, 256} (4 points, 2 at a time)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil
import pytest

from greta.__main__ import main
from greta.checks.verify import verify
from greta.probe.vram import physical_index
from greta.record.matrix import load_matrix
from greta.record.params import ParamError
from greta.sweeps import parallel
from greta.sweeps import report as sr
from greta.sweeps.sweep import point_complete, read_config, run_sweep

REPO = Path(__file__).resolve().parent.parent
CPU_SWEEP = REPO / "params" / "cpu_sweep.yaml"
SMALL = ["-p", "ctx=[128,256]", "-p", "threads=1"]
NAMES = ["ctx128-kv0-seed0-bfloat16", "ctx128-kv1-seed0-bfloat16", "ctx256-kv0-seed0-bfloat16",
         "ctx256-kv1-seed0-bfloat16"]


def _sweep(tmp_path_factory, name: str, extra: list[str]) -> Path:
    out_root = tmp_path_factory.mktemp(name)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["sweep", "-f", str(CPU_SWEEP), "-o", str(out_root), "--quiet", *SMALL, *extra])
    (d,) = list(out_root.glob("*/b3_77-sweep/*"))
    assert rc == 0, (d / "sweep_verdict.json").read_text()
    return d


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory, "parallel", ["--gpus", "2"])


@pytest.fixture(scope="module")
def serial_sweep(tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory, "serial", [])


def _log(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "sweep_log.jsonl").read_text().splitlines()]


def _span(d: Path, name: str) -> tuple[datetime, datetime]:
    """When the point's own record says it started and finished."""
    meta = json.loads((d / "points" / name / "metadata.json").read_text())
    return datetime.fromisoformat(meta["started_utc"]), datetime.fromisoformat(meta["finished_utc"])


def _overlapping_pairs(d: Path) -> list[tuple[str, str]]:
    spans = {n: _span(d, n) for n in NAMES}
    return [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1:]
            if max(spans[a][0], spans[b][0]) < min(spans[a][1], spans[b][1])]


# ------------------------------------------------------------------------ the parallel sweep
def test_points_overlap_in_time_on_distinct_slots(parallel_sweep, serial_sweep):
    d = parallel_sweep
    pairs = _overlapping_pairs(d)
    assert (NAMES[0], NAMES[1]) in pairs, pairs  # the first two start together, on slots 0 and 1
    assert _overlapping_pairs(serial_sweep) == []  # the same check on a serial run: nothing overlaps
    log = _log(d)
    started = {e["point"]: e for e in log if e["action"] == "started"}
    assert list(started) == NAMES and [started[n]["gpus"] for n in NAMES[:2]] == [["0"], ["1"]]
    held: dict[str, str] = {}  # replay the log: a slot is never handed to two running points
    for e in log:
        (slot,) = e["gpus"]
        if e["action"] == "started":
            assert slot not in held, (slot, held)
            held[slot] = e["point"]
        else:
            assert held.pop(slot) == e["point"]
    assert held == {} and sorted(e["action"] for e in log) == ["ran"] * 4 + ["started"] * 4
    assert len({started[n]["pid"] for n in NAMES} | {os.getpid()}) == 5  # a process of its own per point


def test_every_record_verifies_and_matches_the_serial_run(parallel_sweep, serial_sweep):
    for n in NAMES:
        assert verify(parallel_sweep / "points" / n) == [] and point_complete(parallel_sweep / "points" / n)[0], n
        for f in ("verdict.json", "params.json"):
            a = json.loads((parallel_sweep / "points" / n / f).read_text())
            b = json.loads((serial_sweep / "points" / n / f).read_text())
            assert a == b, (n, f)
    logits = {(which, n): np.load(d / "points" / n / "logits.npz")["decode"]
              for which, d in (("par", parallel_sweep), ("ser", serial_sweep)) for n in NAMES}
    for n in NAMES[1::2]:  # kv_aligned=1: deterministic, so the same bits whichever way the sweep ran
        assert np.array_equal(logits[("par", n)], logits[("ser", n)]), n
    assert not np.array_equal(logits[("par", NAMES[1])], logits[("ser", NAMES[3])])  # control: another point differs


def test_guardrail_and_report_are_the_serial_runs(parallel_sweep, serial_sweep):
    par = json.loads((parallel_sweep / "sweep_verdict.json").read_text())
    ser = json.loads((serial_sweep / "sweep_verdict.json").read_text())
    assert (par["verdict"], par["reasons"]) == (ser["verdict"], ser["reasons"]) and par["verdict"] == "PASS_GUARDRAIL"
    assert par["report_error"] is None and (parallel_sweep / "sweep_report.html").is_file()
    assert read_config(parallel_sweep)["points"] == read_config(serial_sweep)["points"] == NAMES
    assert "gpus" not in read_config(parallel_sweep)  # how it ran is not part of the declared matrix


# ------------------------------------------------------------------------ interrupted and killed sweeps
def _start_cli(out_root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "greta", "sweep", "-f", str(CPU_SWEEP), "-o", str(out_root),
                             "--quiet", "--gpus", "2", *SMALL], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_two_running_points(out_root: Path, timeout_s: float = 60) -> tuple[Path, list[dict]]:
    """(sweep dir, the started entries) once two points' processes have started their records."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for d in out_root.glob("*/b3_77-sweep/*"):
            if len(list(d.glob("points/*/perf.json"))) == 2 and (d / "sweep_log.jsonl").is_file():
                return d, [e for e in _log(d) if e["action"] == "started"]
        time.sleep(0.1)
    raise AssertionError("two points never started")


def _session_processes(pids: list[int]) -> list[psutil.Process]:
    """Live processes of the points' sessions (a point's process and the probe's workers it started)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in pids and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            pass
    return out


def _check_environments(started: list[dict]) -> None:
    """Each running point's process and its workers see the point's group and have multicast off."""
    procs = _session_processes([e["pid"] for e in started])
    assert len(procs) >= 2
    for p in procs:
        env = p.environ()
        (e,) = [e for e in started if e["pid"] == os.getsid(p.pid)]
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(e["gpus"]), (env.get("CUDA_VISIBLE_DEVICES"), e)
        assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == ("0", "1", "1")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_sweep_leaves_interrupted_records_and_resumes(tmp_path, sig):
    """SIGTERM: the sweep stops its points and exits 130. SIGKILL: the sweep dies at once and its points get
    SIGTERM from the kernel (PR_SET_PDEATHSIG). Either way the two running points end INTERRUPTED, complete,
    no process is left, and a resume reruns them and completes the sweep."""
    proc = _start_cli(tmp_path)
    d, started = _wait_for_two_running_points(tmp_path)
    _check_environments(started)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL), err
    if sig == signal.SIGTERM:
        assert "sweep INTERRUPTED by SIGTERM" in err and f"--resume {d}" in err
    end = time.monotonic() + 60
    while _session_processes([e["pid"] for e in started]) and time.monotonic() < end:
        time.sleep(0.2)
    assert _session_processes([e["pid"] for e in started]) == []
    for e in started:
        pd = d / "points" / e["point"]
        assert verify(pd) == [], e["point"]
        assert json.loads((pd / "verdict.json").read_text())["verdict"] == "INTERRUPTED"
    assert sorted(p.name for p in (d / "points").iterdir()) == NAMES[:2]  # the others never started
    run_sweep(None, None, sweep_dir=d, progress=False, report=False, gpus=2)
    assert all(point_complete(d / "points" / n)[0] for n in NAMES)
    assert sorted(p.name for p in (d / "points").glob("*.incomplete-1")) == [f"{n}.incomplete-1" for n in NAMES[:2]]
    assert sr.guardrail(sr.collect(d), read_config(d))[0] == "PASS_GUARDRAIL"


@pytest.mark.slow
def test_a_point_process_that_dies_gets_a_fail_error_record(tmp_path):
    """SIGKILL to one point's process (not the sweep): the sweep kills what is left of its session (the probe's
    worker), completes its record from the checkpoint as FAIL_ERROR naming the signal, and runs the rest."""
    proc = _start_cli(tmp_path)
    d, started = _wait_for_two_running_points(tmp_path)
    victim = started[1]
    assert victim["point"] == NAMES[1]  # kv_aligned=1: its failure fails the guardrail
    os.kill(victim["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and out.startswith("FAIL_GUARDRAIL"), out + err
    v = json.loads((d / "points" / victim["point"] / "verdict.json").read_text())
    assert v["verdict"] == "FAIL_ERROR" and "signal 9 (SIGKILL)" in v["reason"], v
    assert all(point_complete(d / "points" / n)[0] for n in NAMES)
    assert _session_processes([e["pid"] for e in _log(d) if e["action"] == "started"]) == []
    errors = [e for e in _log(d) if e["action"] == "error"]
    assert errors == [] and sum(e["action"] == "ran" for e in _log(d)) == 4


def test_a_failing_point_does_not_stop_the_others(tmp_path):
    """kv_aligned=1's worker is killed in decode: FAIL_ERROR, a complete record; the kv0 point runs beside it."""
    m = tmp_path / "m.yaml"
    m.write_text(CPU_SWEEP.read_text().replace("ctx: [256, 512]", "ctx: [128]")
                 + "point_overrides:\n  - when: {kv_aligned: 1}\n    set: {fault: 'kill:decode'}\n")
    d = run_sweep(m, {"threads": 1}, out_root=tmp_path / "out", progress=False, report=False, gpus=2)
    v1 = json.loads((d / "points" / "ctx128-kv1-seed0-bfloat16" / "verdict.json").read_text())
    v0 = json.loads((d / "points" / "ctx128-kv0-seed0-bfloat16" / "verdict.json").read_text())
    assert (v1["verdict"], v1["failed_phase"], v0["verdict"]) == ("FAIL_ERROR", "decode", "EXPECTED_DRIFT")
    assert all(point_complete(p)[0] for p in (d / "points").iterdir())
    assert sr.guardrail(sr.collect(d), read_config(d))[0] == "FAIL_GUARDRAIL"
    ran = {e["point"]: e["verdict"] for e in _log(d) if e["action"] == "ran"}
    assert ran == {"ctx128-kv0-seed0-bfloat16": "EXPECTED_DRIFT", "ctx128-kv1-seed0-bfloat16": "FAIL_ERROR"}


# ------------------------------------------------------------------------ bad --gpus, the pool, the environment
@pytest.mark.parametrize("extra,match", [
    (["--gpus", "0"], "--gpus 0: give how many GPUs"),
    (["--gpus", "-2"], "--gpus -2: give how many GPUs"),
    (["--gpus", "two"], "argument --gpus: invalid int value: 'two'"),
    (["--gpus", "1", "-p", "model=tiny-tp", "-p", "tp=2"], "--gpus 1 is fewer than the tp=2 GPUs"),
])
def test_bad_gpus_is_one_line_and_starts_nothing(tmp_path, capsys, extra, match):
    assert main(["sweep", "-f", str(CPU_SWEEP), "-o", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("greta: error:") and match in err and "\n" not in err, err
    assert not list(tmp_path.glob("*/b3_77-sweep"))


def test_pool_ids_on_gpus(monkeypatch):
    """On CUDA the pool is the sweep's visible GPUs; a pinned device and too many GPUs are refused in one line."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cuda = load_matrix(CPU_SWEEP, {"device": "cuda"})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parallel.pool_ids(cuda, 4) == ["0", "1", "2", "3"] and parallel.pool_ids(cuda, 2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert parallel.pool_ids(cuda, 3) == ["4", "5", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8d1c,GPU-77aa")
    with pytest.raises(ParamError, match="list the GPUs by index"):
        parallel.pool_ids(cuda, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    for matrix, gpus, match in ((cuda, 5, "--gpus 5 but this machine shows 4 GPU(s)"),
                                (load_matrix(CPU_SWEEP, {"device": "cuda:1"}), 2, "with device=cuda:1")):
        with pytest.raises(ParamError) as e:
            parallel.pool_ids(matrix, gpus)
        assert match in str(e.value) and "\n" not in str(e.value)


def test_pool_hands_out_the_lowest_free_groups():
    pool = parallel.Pool(["4", "5", "6", "7"])
    a, b = pool.take(2), pool.take(1)
    assert (a, b, pool.take(2)) == (["4", "5"], ["6"], None)  # one left: a tp=2 point waits
    pool.give(a)
    assert pool.take(2) == ["4", "5"] and pool.take(1) == ["7"] and pool.take(1) is None


def test_point_environment_maps_back_to_the_physical_gpus():
    env = parallel.point_environ(["2", "3"], base={"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["PATH"] == "/bin"
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == ("0", "1", "1")
    # the point's rank 1 (cuda:1) is physical GPU 3 to its NVML/amdsmi sampler; without the group it would read GPU 1
    assert physical_index(1, env["CUDA_VISIBLE_DEVICES"]) == 3 and physical_index(1, None) == 1
