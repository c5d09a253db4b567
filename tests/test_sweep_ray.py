"""Sweeps on a Ray cluster (greta sweep --executor ray, greta/sweeps/ray_executor.py) on the CPU: one local Ray
cluster on the loopback address for the module (2 CPUs, no dashboard). A CPU sweep run as Ray tasks gives the
records and guardrail verdict of the serial sweep run here; a point no node can hold is refused before anything
runs; a resume reruns only the point that is missing; Ray absent or misused is one line. The matrix:
params/cpu_sweep.yaml at ctx {128, 256} (4 points)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import own_ray_tmpdir
from greta.__main__ import main
from greta.checks.verify import verify
from greta.record.matrix import load_matrix
from greta.record.params import ParamError
from greta.sweeps import sweep as sw
from greta.sweeps.ray_executor import LOOPBACK_ONLY
from greta.sweeps.sweep import point_complete, run_sweep

os.environ.setdefault(LOOPBACK_ONLY, "0")  # before ray is imported: the module's cluster binds to 127.0.0.1 only
ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent
CPU_SWEEP = REPO / "params" / "cpu_sweep.yaml"
SMALL = ["-p", "ctx=[128,256]", "-p", "threads=1"]
NAMES = ["ctx128-kv0-seed0-bfloat16", "ctx128-kv1-seed0-bfloat16", "ctx256-kv0-seed0-bfloat16",
         "ctx256-kv1-seed0-bfloat16"]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (its start-up takes seconds): the executor joins it. Its session
    files are in a folder of the module's own (conftest.own_ray_tmpdir), removed after."""
    with own_ray_tmpdir():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 _node_ip_address="127.0.0.1")
        nodes = ray.nodes()
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}, "the test cluster must stay on loopback"
        yield nodes
        ray.shutdown()


def _sweep(tmp_path_factory, name: str, extra: list[str]) -> Path:
    out_root = tmp_path_factory.mktemp(name)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["sweep", "-f", str(CPU_SWEEP), "-o", str(out_root), "--quiet", *SMALL, *extra])
    (d,) = list(out_root.glob("*/b3_77-sweep/*"))
    assert rc == 0, (d / "sweep_verdict.json").read_text()
    return d


@pytest.fixture(scope="module")
def ray_sweep(cluster, tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory, "ray", ["--executor", "ray"])


@pytest.fixture(scope="module")
def serial_sweep(tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory, "serial", [])


def _log(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "sweep_log.jsonl").read_text().splitlines()]


def test_ray_sweep_matches_the_serial_sweep(ray_sweep, serial_sweep, cluster):
    for n in NAMES:
        assert verify(ray_sweep / "points" / n) == [] and point_complete(ray_sweep / "points" / n)[0], n
        for f in ("verdict.json", "params.json"):
            assert json.loads((ray_sweep / "points" / n / f).read_text()) == \
                json.loads((serial_sweep / "points" / n / f).read_text()), (n, f)
    logits = {(w, n): np.load(d / "points" / n / "logits.npz")["decode"]
              for w, d in (("ray", ray_sweep), ("ser", serial_sweep)) for n in NAMES}
    for n in NAMES[1::2]:  # kv_aligned=1: deterministic, the same bits whichever way the sweep ran
        assert np.array_equal(logits[("ray", n)], logits[("ser", n)]), n
    assert not np.array_equal(logits[("ray", NAMES[1])], logits[("ser", NAMES[3])])  # control: another point differs
    a, b = (json.loads((d / "sweep_verdict.json").read_text()) for d in (ray_sweep, serial_sweep))
    assert (a["verdict"], a["reasons"]) == (b["verdict"], b["reasons"]) and a["verdict"] == "PASS_GUARDRAIL"
    ran = [e for e in _log(ray_sweep) if e["action"] == "ran"]
    addresses = {f"{nd['NodeManagerAddress']} ({nd['NodeID'][:8]})" for nd in cluster}
    assert sorted(e["point"] for e in ran) == NAMES and all(e["node"] in addresses for e in ran), ran
    assert "node" not in json.dumps(_log(serial_sweep))  # the node is named only where Ray ran the point


def test_resume_on_ray_reruns_only_the_missing_point(ray_sweep, tmp_path, cluster):
    d = tmp_path / "resumed"
    shutil.copytree(ray_sweep, d)
    shutil.rmtree(d / "points" / NAMES[1])
    (d / "sweep_log.jsonl").unlink()
    run_sweep(None, None, sweep_dir=d, progress=False, report=False, executor="ray")
    assert sorted((e["action"], e["point"]) for e in _log(d)) == sorted(
        [("skipped", n) for n in NAMES if n != NAMES[1]] + [("started", NAMES[1]), ("ran", NAMES[1])])
    assert point_complete(d / "points" / NAMES[1])[0]
    assert json.loads((d / "points" / NAMES[1] / "verdict.json").read_text())["verdict"] == "PASS_EQUIV"


def test_a_point_no_node_can_hold_is_refused_before_anything_runs(cluster, tmp_path):
    wide = load_matrix(CPU_SWEEP, {"device": "cuda"})  # no preflight: this machine has no GPU
    with pytest.raises(ParamError) as e:
        sw._executor(wide, None, "ray", None)
    msg = str(e.value)
    assert "\n" not in msg and "needs 1 GPU(s) on one node" in msg and "has 0" in msg, msg
    assert sw._executor(load_matrix(CPU_SWEEP, None), None, "ray", None).name == "ray"  # control: CPU points fit


def test_bad_executor_arguments_are_one_line(cluster, tmp_path, monkeypatch, capsys):
    cases = [(["--executor", "ray", "--gpus", "2"], "leave --gpus out"),
             (["--address", "127.0.0.1:6379"], "needs --executor ray")]
    for extra, want in cases:
        assert main(["sweep", "-f", str(CPU_SWEEP), "-o", str(tmp_path), "--quiet", *SMALL, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert want in err and "\n" not in err, err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert main(["sweep", "-f", str(CPU_SWEEP), "-o", str(tmp_path), "--quiet", *SMALL, "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'greta[ray]'" in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing was created


# ------------------------------------------------------------------------ a killed point and an interrupt
def _point_processes(sweep_dir: Path) -> dict[str, psutil.Process]:
    """The live point processes of this sweep, by point name."""
    out = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "greta.sweeps.point" in cmd and str(sweep_dir) in cmd:
            out[cmd[-1]] = p
    return out


def _wait(what, timeout_s: float = 180):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what.__doc__}")


@pytest.mark.slow
def test_killed_point_is_fail_error_naming_the_node_and_ctrl_c_leaves_interrupted_records(cluster, tmp_path):
    """The CLI starts its own local Ray cluster. SIGKILL to one point's process: FAIL_ERROR naming the node.
    Then Ctrl-C to the sweep: exit 130, every started point complete or INTERRUPTED, no point process left;
    a resume on Ray completes the sweep and keeps the FAIL_ERROR (a complete result)."""
    proc = subprocess.Popen([sys.executable, "-m", "greta", "sweep", "-f", str(CPU_SWEEP), "-o", str(tmp_path),
                             "--quiet", *SMALL, "--executor", "ray"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def victim_running():
        """the point process of the kv_aligned=1 ctx128 point"""
        for d in tmp_path.glob("*/b3_77-sweep/*"):
            if (d / "points" / NAMES[1] / "perf.json").is_file() and NAMES[1] in _point_processes(d):
                return d, _point_processes(d)[NAMES[1]]
    d, victim = _wait(victim_running)
    victim.kill()
    verdict = d / "points" / NAMES[1] / "verdict.json"
    _wait(lambda: verdict.is_file() and [e for e in _log(d) if e["action"] in ("ran", "error")])
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "sweep INTERRUPTED by SIGINT" in err, err
    v = json.loads(verdict.read_text())
    named = re.search(r"signal 9 \(SIGKILL\) on node \S+ \([0-9a-f]{8}\)", v["reason"])
    assert v["verdict"] == "FAIL_ERROR" and named, v
    _wait(lambda: not _point_processes(d), 60)
    verdicts = {p.name: json.loads((p / "verdict.json").read_text())["verdict"] for p in (d / "points").iterdir()}
    assert all(verify(d / "points" / n) == [] for n in verdicts), verdicts
    assert "INTERRUPTED" in verdicts.values() or len(verdicts) < 4, verdicts  # the interrupt stopped something
    run_sweep(None, None, sweep_dir=d, progress=False, report=False, executor="ray")
    assert all(point_complete(d / "points" / n)[0] for n in NAMES)
    assert json.loads(verdict.read_text())["verdict"] == "FAIL_ERROR"  # not rerun
