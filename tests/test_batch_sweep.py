"""Sweeps of the batch probe: the batch axis of a matrix (point names, order, only where declared), the
guardrail's verdict for batch points, the batch figures' data (throughput and worst |Δ| vs B), and (slow) a CPU
batch sweep end to end whose report draws both plots."""
from __future__ import annotations

import json

import pytest

from greta.record.matrix import load_matrix
from greta.reports import sweep_batch as sb
from greta.sweeps.report import guardrail


def test_the_batch_axis_names_and_orders_points(repo_root):
    m = load_matrix(repo_root / "params" / "cpu_batch_sweep.yaml")
    assert list(m.params) == ["ctx256-kv1-b1-seed0-bfloat16", "ctx256-kv1-b3-seed0-bfloat16",
                              "ctx256-kv0-b1-seed0-bfloat16", "ctx256-kv0-b3-seed0-bfloat16"]
    assert [p.batch for p in m.points()] == [1, 3, 1, 3] and all(p.probe == "batch" for p in m.points())
    plain = load_matrix(repo_root / "params" / "cpu_sweep.yaml")
    assert "batch" not in plain.axes and list(plain.params)[0] == "ctx256-kv0-seed0-bfloat16"


@pytest.mark.parametrize("name", ["batch_4k.yaml", "batch_32k.yaml"])
def test_the_gpu_matrices_parse(repo_root, name):
    m = load_matrix(repo_root / "params" / name)
    assert {p.kv_aligned for p in m.points()} == {0, 1} and max(p.batch for p in m.points()) in (8, 32)


def row(name, batch, kv, verdict, diff, tps=None, floor=None):
    full = {"tokens_per_s": tps, "floor_tokens_per_s": floor, "ratio_of_floor": tps / floor} if tps else None
    return {"name": name, "ctx": 4096, "kv_aligned": kv, "batch": batch, "probe": "batch", "seed": 0,
            "dtype": "bfloat16", "verdict": verdict, "max_abs_diff": diff, "complete": True, "exists": True,
            "batch_throughput": {"full_batch": full} if full else {}}


ROWS = [row("a", 1, 1, "PASS_BATCH_INVARIANT", 0.0, 30.0, 40.0), row("b", 4, 1, "PASS_BATCH_INVARIANT", 0.0, 110.0, 150.0),
        row("c", 1, 0, "BATCH_DRIFT", 0.02, 32.0, 40.0), row("d", 4, 0, "FAIL_OOM", None)]
MATRIX = {"axes": {"ctx": [4096], "kv_aligned": [1, 0], "batch": [1, 4], "seed": [0], "dtype": ["bfloat16"]}}


def test_figures_data():
    t = sb.throughput_series(ROWS)
    assert [(s["kv_aligned"], s["batch"], s["tokens_per_s"]) for s in t] == [(1, [1, 4], [30.0, 110.0]), (0, [1], [32.0])]
    assert t[0]["floor_tokens_per_s"] == [40.0, 150.0]
    d = sb.diff_series(ROWS)
    assert d[1]["max_abs_diff"] == [0.02, None]  # the OOM point is kept, without a figure
    assert "FAIL_OOM" in sb.table_md(ROWS) and "73%" in sb.table_md(ROWS)


def test_the_guardrail_holds_batch_points_to_pass_batch_invariant():
    named = [dict(r, name=n) for r, n in zip(ROWS, ["ctx4096-kv1-b1-seed0-bfloat16", "ctx4096-kv1-b4-seed0-bfloat16",
                                                  "ctx4096-kv0-b1-seed0-bfloat16", "ctx4096-kv0-b4-seed0-bfloat16"])]
    assert guardrail(named, MATRIX)[0] == "PASS_GUARDRAIL"
    named[1]["verdict"] = "FAIL_BATCH_INVARIANT"
    verdict, reasons = guardrail(named, MATRIX)
    assert verdict == "FAIL_GUARDRAIL" and "not PASS_BATCH_INVARIANT" in reasons[0]


@pytest.mark.slow
def test_a_cpu_batch_sweep_end_to_end(repo_root, tmp_path):
    from greta.sweeps.sweep import run_sweep

    d = run_sweep(repo_root / "params" / "cpu_batch_sweep.yaml", out_root=tmp_path, progress=False)
    v = json.loads((d / "sweep_verdict.json").read_text())
    assert v["verdict"] == "PASS_GUARDRAIL" and v["report_error"] is None
    assert all((d / name).is_file() for name in sb.PLOTS)
    page = (d / "sweep_report.html").read_text()
    assert "Batch probe sweep report" in page and "B3.77" not in page and "| B |" not in page  # an HTML table
    assert "<th>B</th>" in page and "Price of exactness per B" in page and "Drift vs B" in page
    assert str(tmp_path) not in page
    _verify_sweep_and_its_controls(d)


def _verify_sweep_and_its_controls(d):
    """greta verify of a sweep directory checks each point, the log and the aggregate: it passes, and each
    tampering is named."""
    import shutil

    from greta.__main__ import main
    from greta.sweeps.verify import verify_sweep

    assert verify_sweep(d) == [] and main(["verify", str(d)]) == 0
    v = json.loads((d / "sweep_verdict.json").read_text())
    (d / "sweep_verdict.json").write_text(json.dumps({**v, "verdict": "FAIL_GUARDRAIL"}))
    assert any("sweep_verdict.json says FAIL_GUARDRAIL" in r for r in verify_sweep(d))
    (d / "sweep_verdict.json").write_text(json.dumps(v))
    log = (d / "sweep_log.jsonl").read_text()
    (d / "sweep_log.jsonl").write_text(log.replace("PASS_BATCH_INVARIANT", "FAIL_BATCH_INVARIANT", 1))
    assert any("sweep_log.jsonl last logged" in r for r in verify_sweep(d))
    (d / "sweep_log.jsonl").write_text(log)
    name = v["points"] and next(iter(v["points"]))
    (d / "points" / name / "report.md").write_text("tampered")
    reasons = verify_sweep(d)
    assert any(r.startswith(f"point {name}: report.md changed after the record was sealed") for r in reasons)
    _hostile_sweep_files_are_refused_without_blocking(d, name)
    shutil.rmtree(d / "points" / name)
    assert f"point {name}: no record under points/" in verify_sweep(d) and main(["verify", str(d)]) == 1


def _hostile_sweep_files_are_refused_without_blocking(d, name):
    """A sweep directory is untrusted: a FIFO for the log (which would block a plain read), a symlink for the
    verdict and a symlinked point directory are each named, never opened or followed."""
    import os
    import shutil

    from greta.sweeps.verify import verify_sweep

    log = d / "sweep_log.jsonl"
    kept = log.read_bytes()
    log.unlink()
    os.mkfifo(log)
    assert any(r.startswith("sweep_log.jsonl cannot be read") and "FIFO" in r for r in verify_sweep(d))
    log.unlink()
    log.write_bytes(kept)
    verdict = d / "sweep_verdict.json"
    verdict.rename(d / "elsewhere.json")
    verdict.symlink_to(d / "elsewhere.json")
    assert any(r.startswith("sweep_verdict.json cannot be read") for r in verify_sweep(d))
    verdict.unlink()
    (d / "elsewhere.json").rename(verdict)
    point = d / "points" / name
    shutil.move(point, d / "moved")
    point.symlink_to(d / "moved", target_is_directory=True)
    assert f"point {name}: points/{name} is a symlink, not a record directory" in verify_sweep(d)
    point.unlink()
    shutil.move(d / "moved", point)
