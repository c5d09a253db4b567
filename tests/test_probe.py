"""greta.probe.runner.run_probe end to end on the CPU (tiny preset, small context): the record of a passing run,
the drift and negative-control verdicts, injected faults (hang, OOM, crash, error) and never-overwritten
records. Each probe run starts a spawned worker process (a few seconds), so each configuration runs once
per module and the tests share its record.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from greta.record.metrics import compare
from greta.record.params import PHASES
from greta.probe.runner import run_probe
from greta.record.store import seal
from greta.checks.verify import verify
from greta.record.samples import CSV_COLUMNS, read_samples_csv

HEADER = "| Context | KV | Peak RSS (MiB) | Max Logits Diff | Top-1 Agreement | Verdict |"  # a CPU run: the process RSS

CONFIGS = {
    "pass": {},
    "drift": {"kv_aligned": 0},
    "rope": {"perturb": "rope_offset"},
    "hang": {"fault": "hang:decode", "timeouts.decode": 3},
    "oom": {"fault": "oom:prefill"},
    **{f"oom:{ph}": {"fault": f"oom:{ph}"} for ph in ("ceilings", "load", "decode", "reference")},
    "crash": {"fault": "crash:decode"},
    "kill": {"fault": "kill:prefill"},
    "error": {"fault": "error:reference"},
}


def spawned_children() -> list[psutil.Process]:
    """Live multiprocessing-spawned children of this process (the probe's worker), resource tracker excluded."""
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(c.cmdline())
            if "spawn_main" in cmd and "resource_tracker" not in cmd and c.status() != psutil.STATUS_ZOMBIE:
                out.append(c)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_params):
    """runs(name) -> {"dir", "params", "elapsed_s", "children_after", "mp_children_after"}; each runs once."""
    root = tmp_path_factory.mktemp("probe-records")
    done: dict = {}

    def get(name: str) -> dict:
        if name not in done:
            params = small_params(**CONFIGS[name])
            t0 = time.monotonic()
            run_dir = run_probe(params, out_root=root, progress=False)
            elapsed = time.monotonic() - t0
            done[name] = {"dir": Path(run_dir), "params": params, "elapsed_s": elapsed,
                          "children_after": spawned_children(),
                          "mp_children_after": [p.name for p in multiprocessing.active_children()]}
        return done[name]

    get.root = root
    return get


def rj(run_dir: Path, name: str):
    return json.loads((run_dir / name).read_text())


# --- a passing run: the complete record ------------------------------------------------------------------
def test_pass_run_verdict(runs):
    d = runs("pass")["dir"]
    v = rj(d, "verdict.json")
    assert v["verdict"] == "PASS_EQUIV", v["reason"]
    assert v["bit_exact"] is True and v["failed_phase"] is None and v["kv_aligned"] == 1
    assert "\n" not in v["reason"]


def test_pass_run_has_every_documented_file(runs, record_doc_files):
    d = runs("pass")["dir"]
    probe_files = record_doc_files[: record_doc_files.index("report.md") + 1]
    assert probe_files[0] == "params.json" and len(probe_files) == 9
    missing = [f for f in probe_files if not (d / f).is_file()]
    assert not missing
    assert not list(d.glob("*.tmp"))


def test_pass_run_directory_layout(runs):
    d = runs("pass")["dir"]
    rel = d.relative_to(runs.root).parts
    assert len(rel) == 3 and rel[1] == "b3_77"
    assert len(rel[0]) == 10 and rel[0][4] == "-"  # YYYY-MM-DD
    assert "-tiny-ctx256-kv1-" in rel[2]


def test_pass_run_params_and_metadata(runs):
    r = runs("pass")
    d = r["dir"]
    assert rj(d, "params.json") == r["params"].to_dict()
    meta = rj(d, "metadata.json")
    assert "commit" in meta and "dirty" in meta
    assert meta["commit"] is None or len(meta["commit"]) == 40
    for key in ("host", "versions", "started_utc", "finished_utc", "seed", "model", "model_hash", "device_name"):
        assert meta.get(key) is not None, key
    assert meta["versions"]["torch"] and meta["versions"]["python"]
    assert meta["model"] == "tiny" and meta["model_hash"].startswith("sha256:")
    assert meta["weights_source"] == "synthetic"
    assert meta["finished_utc"] >= meta["started_utc"]


def test_pass_run_perf(runs):
    perf = rj(runs("pass")["dir"], "perf.json")
    for ph in PHASES:
        assert perf[ph]["status"] == "ok", ph
        assert isinstance(perf[ph]["wall_s"], float) and perf[ph]["wall_s"] > 0, ph
        assert perf[ph]["timeout_s"] > 0
    assert perf["roofline"]["available"] is True
    assert perf["roofline"]["ceilings"]["matmul_tflops"] > 0


def test_pass_run_logits_and_metrics_agree(runs):
    r = runs("pass")
    d, p = r["dir"], r["params"]
    z = np.load(d / "logits.npz")
    span, ctx = p.span, p.ctx
    assert z["decode"].dtype == np.float32 and z["decode"].shape == (span, 2048)
    assert z["reference"].shape == (span, 2048)
    assert z["positions"].tolist() == list(range(ctx - 1, ctx + span - 1))
    assert len(z["tokens"]) == p.gen + 1
    assert np.isfinite(z["decode"]).all()
    m = rj(d, "metrics.json")
    assert len(m["per_position"]) == span
    assert [row["position"] for row in m["per_position"]] == z["positions"].tolist()
    assert m["bit_exact"] is True and m["max_abs_diff"] == 0.0
    # the metrics are what the stored logits say, recomputed here
    again = compare(z["decode"], z["reference"], z["tokens"].tolist(), z["positions"].tolist(),
                    [row["source"] for row in m["per_position"]])
    assert again == m
    assert np.array_equal(z["decode"], z["reference"])


def test_pass_run_vram(runs):
    d = runs("pass")["dir"]
    with open(d / "vram_samples.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == CSV_COLUMNS
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    for ph in PHASES:
        assert sum(r["phase"] == ph for r in body) >= 1, ph
    assert all(float(r["device_used_mb"]) > 0 for r in body)
    assert all(r["allocated_mb"] == "" for r in body)  # no allocator on the CPU
    v = rj(d, "vram.json")
    assert v["backend"] == "rss"
    assert v["samples_count"] == len(body)
    assert [ph["name"] for ph in v["phases"]] == list(PHASES)
    assert v["peak_vram_mb"] >= v["floor"]["total_mb"] > 0
    assert v["below_floor"] is False


def test_pass_run_report(runs):
    r = runs("pass")
    text = (r["dir"] / "report.md").read_text()
    lines = text.splitlines()
    assert HEADER in lines
    row = lines[lines.index(HEADER) + 2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "256" and cells[1] == "1" and cells[5] == "PASS_EQUIV"
    assert float(cells[3]) == 0.0 and float(cells[4]) == 1.0
    assert r["dir"].name in text


# --- verdicts --------------------------------------------------------------------------------------------
def test_unaligned_run_is_expected_drift(runs):
    d = runs("drift")["dir"]
    v = rj(d, "verdict.json")
    assert v["verdict"] == "EXPECTED_DRIFT" and v["kv_aligned"] == 0
    m = rj(d, "metrics.json")
    assert m["finite"] and m["max_abs_diff"] < 0.1 and m["top1_agreement"] == 1.0
    assert "| 256 | 0 |" in (d / "report.md").read_text()


def test_negative_control_fails_the_check(runs):
    """The required 'the check can fail' test: a deliberately broken decode path must not pass."""
    d = runs("rope")["dir"]
    v = rj(d, "verdict.json")
    assert v["verdict"] == "FAIL_EQUIV", v["reason"]
    assert v["bit_exact"] is False and v["perturb"] == "rope_offset"
    m = rj(d, "metrics.json")
    assert m["max_abs_diff"] > 5e-3
    assert m["per_position"][0]["max_abs_diff"] == 0.0  # step 0 is prefill: untouched by the perturbation
    assert "NEGATIVE CONTROL" in (d / "report.md").read_text()


def test_two_runs_two_directories(runs):
    a, b = runs("pass")["dir"], runs("drift")["dir"]
    assert a != b and a.is_dir() and b.is_dir()
    # the first run's record is still intact after the second
    assert rj(a, "verdict.json")["verdict"] == "PASS_EQUIV"


def test_identical_params_still_get_fresh_directories(tmp_path, small_params):
    params = small_params(fault="error:ceilings")
    d1 = run_probe(params, out_root=tmp_path, progress=False)
    d2 = run_probe(params, out_root=tmp_path, progress=False)
    assert d1 != d2
    for d in (d1, d2):
        v = rj(d, "verdict.json")
        assert v["verdict"] == "FAIL_ERROR" and v["failed_phase"] == "ceilings"
        assert (d / "report.md").is_file() and (d / "vram.json").is_file()


def test_existing_record_is_never_overwritten(tmp_path, small_params):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "params.json").write_text('{"mine": true}\n')
    with pytest.raises(FileExistsError):
        run_probe(small_params(), out_root=tmp_path, run_dir=run_dir, progress=False)
    assert (run_dir / "params.json").read_text() == '{"mine": true}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["params.json"]


# --- faults ----------------------------------------------------------------------------------------------
def assert_failure_record(d: Path, verdict: str, phase: str) -> dict:
    for f in ("params.json", "metadata.json", "perf.json", "vram.json", "vram_samples.csv", "verdict.json",
              "report.md"):
        assert (d / f).is_file(), f
    assert not (d / "logits.npz").exists() and not (d / "metrics.json").exists()
    v = rj(d, "verdict.json")
    assert v["verdict"] == verdict, v
    assert v["failed_phase"] == phase and v["bit_exact"] is None
    assert phase in v["reason"] and "\n" not in v["reason"]
    perf = rj(d, "perf.json")
    i = PHASES.index(phase)
    assert all(perf[ph]["status"] == "ok" for ph in PHASES[:i])
    assert all(perf[ph]["status"] == "not_run" for ph in PHASES[i + 1:])
    report = (d / "report.md").read_text()
    assert HEADER in report and f"| {verdict} |" in report
    assert rj(d, "vram.json")["backend"] == "rss"
    samples = read_samples_csv(d / "vram_samples.csv")
    assert any(r["phase"] == phase for r in samples), "VRAM samples up to the failure"
    assert verify(d) == [], "a complete record of a failure verifies"
    return perf


@pytest.mark.parametrize("phase", ["ceilings", "load", "decode", "reference"])
def test_oom_in_every_phase(runs, phase, tmp_path):
    r = runs(f"oom:{phase}")
    perf = assert_failure_record(r["dir"], "FAIL_OOM", phase)
    assert perf[phase]["memory"]["rss_mb"] > 0
    assert all(perf[ph]["wall_s"] > 0 for ph in PHASES[:PHASES.index(phase)])
    assert r["children_after"] == []
    # A run that died before its load phase finished never held weights + KV (a real GPU OOM allocating the
    # cache peaks below the floor): its peak is not held against the floor. Once loaded, it is.
    loaded = PHASES.index(phase) > PHASES.index("load")
    assert rj(r["dir"], "vram.json")["floor_applies"] is loaded
    d = tmp_path / "low"
    shutil.copytree(r["dir"], d)
    vs = rj(d, "vram.json")
    vs["peak_vram_mb"] = vs["floor"]["total_mb"] / 2
    (d / "vram.json").write_text(json.dumps(vs))
    seal(d)
    assert any("below the analytic floor" in x for x in verify(d)) is loaded


def test_hang_is_a_timeout_and_the_worker_is_killed(runs):
    r = runs("hang")
    perf = assert_failure_record(r["dir"], "FAIL_TIMEOUT", "decode")
    assert perf["decode"]["status"] == "timeout" and perf["decode"]["timeout_s"] == 3
    assert 3 <= perf["decode"]["runner_wall_s"] < 15
    assert "timeout" in rj(r["dir"], "verdict.json")["reason"]
    assert r["elapsed_s"] < 30
    assert r["children_after"] == []
    assert "greta-probe-worker" not in r["mp_children_after"]


def test_oom_names_the_phase_with_memory_figures(runs):
    r = runs("oom")
    perf = assert_failure_record(r["dir"], "FAIL_OOM", "prefill")
    assert perf["prefill"]["status"] == "oom"
    mem = perf["prefill"]["memory"]
    assert mem["rss_mb"] > 0 and mem["host_available_mb"] > 0
    assert "traceback" not in perf["prefill"]
    assert r["children_after"] == []


@pytest.mark.parametrize("name,phase,sig", [("crash", "decode", "signal 11 (SIGSEGV)"),
                                            ("kill", "prefill", "signal 9 (SIGKILL)")])
def test_dead_worker_is_fail_error_naming_the_signal(runs, name, phase, sig):
    r = runs(name)
    perf = assert_failure_record(r["dir"], "FAIL_ERROR", phase)
    assert perf[phase]["status"] == "crash"
    assert sig in perf[phase]["error"]
    assert sig in rj(r["dir"], "verdict.json")["reason"]
    assert r["children_after"] == []
    assert r["children_after"] == []


def test_error_is_fail_error_with_the_message(runs):
    r = runs("error")
    perf = assert_failure_record(r["dir"], "FAIL_ERROR", "reference")
    assert perf["reference"]["status"] == "error"
    assert "injected fault in phase reference" in rj(r["dir"], "verdict.json")["reason"]
    assert "injected fault in phase reference" in perf["reference"]["error"]
    # decode finished before the fault: its tokens are kept
    assert len(rj(r["dir"], "verdict.json")["tokens"]) == r["params"].gen + 1


def test_child_detection_sees_a_live_spawned_worker():
    """The 'no leftover worker' assertions above can fail: spawned_children() does see a live spawn child."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=time.sleep, args=(60,), daemon=True, name="greta-probe-worker")
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while not spawned_children() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [c.pid for c in spawned_children()] == [proc.pid]
        assert "greta-probe-worker" in [p.name for p in multiprocessing.active_children()]
    finally:
        proc.kill()
        proc.join(10)
    assert spawned_children() == []


def test_preset_name_wins_over_a_same_named_directory(tmp_path, monkeypatch, small_params):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    params = small_params(ctx=128, gen=4, span=2, kv_block=64)
    d = run_probe(params, out_root=tmp_path / "out", progress=False)
    v = rj(d, "verdict.json")
    assert v["verdict"] == "PASS_EQUIV", v["reason"]
    assert rj(d, "metadata.json")["weights_source"] == "synthetic"
