"""A CPU sweep on a Ray cluster of two nodes on this machine (issue 27): a head and a second node, each its own
raylet process (Ray's own multi-node test harness, ray.cluster_utils.Cluster), both on loopback. The sweep joins it
with --address from another process, as a user's sweep joins a real cluster. What must hold:

- points run on both nodes, and the records are those of the serial sweep (verdicts, params, kv_aligned=1 bits);
- a node that dies while it runs a point (its raylet killed, no grace) gives that point FAIL_ERROR naming the
  node, a record that verifies; the other points complete on the node that is left.

Slow (two sweeps and a cluster start-up): in the `-m slow` selection, which CI runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
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
from greta.sweeps.ray_executor import LOOPBACK_ONLY
from greta.sweeps.sweep import point_complete

os.environ.setdefault(LOOPBACK_ONLY, "0")  # before ray is imported: every node binds to 127.0.0.1 only
ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
CPU_SWEEP = REPO / "params" / "cpu_sweep.yaml"
SMALL = ["-p", "ctx=[128,256]", "-p", "threads=1"]
NAMES = ["ctx128-kv0-seed0-bfloat16", "ctx128-kv1-seed0-bfloat16", "ctx256-kv0-seed0-bfloat16",
         "ctx256-kv1-seed0-bfloat16"]


@pytest.fixture
def two_nodes():
    """A head and a second node of one CPU each (so the sweep's points must spread over both), loopback only, its
    session files in a folder of its own (conftest.own_ray_tmpdir). One such cluster at a time on the machine (a lock on this file,
    held across xdist workers): two of them, each with its sweep, on a 2-core CI machine starve each other's
    points of the CPU the tests' deadlines assume."""
    with open(__file__) as lock, own_ray_tmpdir():
        fcntl.flock(lock, fcntl.LOCK_EX)
        c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            second = c.add_node(num_cpus=1)
            c.wait_for_nodes()
            yield c, second
        finally:
            c.shutdown()


def _node_ids(c) -> dict[str, str]:
    """node id -> address of each live node, read from a short-lived driver in this process."""
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    try:
        return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()


def _start_sweep(c, out: Path) -> subprocess.Popen:
    env = {**os.environ, LOOPBACK_ONLY: "0"}  # the driver too finds its raylet on 127.0.0.1
    return subprocess.Popen([sys.executable, "-m", "greta", "sweep", "-f", str(CPU_SWEEP), "-o", str(out), "--quiet",
                             *SMALL, "--executor", "ray", "--address", c.address], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _log(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "sweep_log.jsonl").read_text().splitlines()]


def _serial(tmp_path: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["sweep", "-f", str(CPU_SWEEP), "-o", str(tmp_path / "serial"), "--quiet", *SMALL]) == 0
    (d,) = (tmp_path / "serial").glob("*/b3_77-sweep/*")
    return d


def test_points_run_on_both_nodes_and_match_the_serial_sweep(two_nodes, tmp_path):
    c, _ = two_nodes
    ids = _node_ids(c)
    proc = _start_sweep(c, tmp_path / "ray")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    (d,) = (tmp_path / "ray").glob("*/b3_77-sweep/*")
    ran = {e["point"]: e["node"] for e in _log(d) if e["action"] == "ran"}
    assert sorted(ran) == NAMES, ran
    used = {node.split("(")[-1].rstrip(")") for node in ran.values()}
    assert used == {i[:8] for i in ids}, (ran, ids)  # both nodes ran points
    serial = _serial(tmp_path)
    for n in NAMES:
        assert verify(d / "points" / n) == [] and point_complete(d / "points" / n)[0], n
        for f in ("verdict.json", "params.json"):
            assert json.loads((d / "points" / n / f).read_text()) == json.loads((serial / "points" / n / f).read_text())
    for n in NAMES[1::2]:  # kv_aligned=1: the same bits on whichever node
        a, b = (np.load(x / "points" / n / "logits.npz")["decode"] for x in (d, serial))
        assert np.array_equal(a, b), n
    a, b = (np.load(d / "points" / n / "logits.npz")["decode"] for n in NAMES[1::2])
    assert not np.array_equal(a, b)  # control: two different points do differ


def _points_under(pid: int) -> list[str]:
    """Names of the sweep points whose process descends from pid (a node's raylet)."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        with contextlib.suppress(psutil.Error):
            cmd = p.cmdline()
            if "greta.sweeps.point" in cmd:
                out.append(cmd[-1])
    return out


def test_a_node_that_dies_under_a_point_is_fail_error_naming_it(two_nodes, tmp_path):
    c, second = two_nodes
    raylet = second.all_processes["raylet"][0].process.pid
    second_id = second.node_id
    proc = _start_sweep(c, tmp_path)
    end, victims = time.monotonic() + 300, []
    while not victims and time.monotonic() < end and proc.poll() is None:
        victims = _points_under(raylet)
        time.sleep(0.1)
    assert victims, "no point ran on the second node"
    c.remove_node(second, allow_graceful=False)  # the node dies: its raylet and workers killed at once
    _, err = proc.communicate(timeout=600)
    (d,) = tmp_path.glob("*/b3_77-sweep/*")
    v = json.loads((d / "points" / victims[0] / "verdict.json").read_text())
    assert v["verdict"] == "FAIL_ERROR" and second_id[:8] in v["reason"], (v, err)
    assert verify(d / "points" / victims[0]) == []
    others = [n for n in NAMES if n != victims[0]]
    for n in others:  # the head node finished the rest
        assert point_complete(d / "points" / n)[0], n
        assert json.loads((d / "points" / n / "verdict.json").read_text())["verdict"] in ("PASS_EQUIV", "EXPECTED_DRIFT")
    sweep = json.loads((d / "sweep_verdict.json").read_text())["verdict"]
    # the guardrail holds the kv_aligned=1 points; a kv_aligned=0 point's FAIL_ERROR is a complete result
    want = "FAIL_GUARDRAIL" if "-kv1-" in victims[0] else "PASS_GUARDRAIL"
    assert sweep == want and (proc.returncode == 0) == (want == "PASS_GUARDRAIL"), (sweep, proc.returncode)
