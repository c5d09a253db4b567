"""greta.checks.analyze.analyze_run on real tiny CPU records, corrupted on purpose: it names the fault and never raises."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest

from greta.checks.analyze import STATUSES, analyze_run, metrics_for_plots, report_md
from greta.record.metrics import compare, equivalence_verdict
from greta.probe.runner import run_probe


@pytest.fixture(scope="module")
def records(tmp_path_factory, small_params):
    """Two real records from the tiny CPU probe: a passing run and a run that hits OOM in prefill."""
    root = tmp_path_factory.mktemp("analyze-records")
    return {"pass": Path(run_probe(small_params(), out_root=root / "pass", progress=False)),
            "oom": Path(run_probe(small_params(fault="oom:prefill"), out_root=root / "oom", progress=False))}


@pytest.fixture
def run(records, tmp_path):
    """A fresh copy of the passing record, free to corrupt."""
    return Path(shutil.copytree(records["pass"], tmp_path / "run"))


def rj(path: Path):
    return json.loads(path.read_text())


def npz(run: Path) -> dict:
    with np.load(run / "logits.npz") as z:
        return {k: z[k] for k in z.files}


def rewrite_npz(run: Path, **arrays) -> None:
    (run / "logits.npz").unlink()
    np.savez_compressed(run / "logits.npz", **arrays)


def check(report: dict, status: str, *words: str) -> str:
    """The report is well formed, has ``status``, and one of its reasons holds every word."""
    assert set(report) >= {"status", "reasons", "metrics", "verdict"}
    assert report["status"] in STATUSES
    assert all(isinstance(r, str) and r and "\n" not in r for r in report["reasons"])
    assert report["status"] == status, report["reasons"]
    hits = [r for r in report["reasons"] if all(w in r for w in words)]
    assert hits, (words, report["reasons"])
    return hits[0]


# --- a good record -------------------------------------------------------------------------------------
def test_good_run_is_ok_and_reproduces_the_stored_metrics(run):
    report = analyze_run(run)
    assert report["status"] == "OK" and report["reasons"] == []
    assert report["metrics"] == rj(run / "metrics.json")
    assert report["verdict"] == report["stored_verdict"] == rj(run / "verdict.json")["verdict"] == "PASS_EQUIV"
    assert "OK" in report_md(report)
    metrics, note = metrics_for_plots(report, run)
    assert metrics == report["metrics"] and "Recomputed" in note


def test_tampered_metrics_are_a_mismatch(run):
    m = rj(run / "metrics.json")
    m["max_abs_diff"] = 0.25
    m["per_position"][2]["argmax_decode"] += 1
    (run / "metrics.json").write_text(json.dumps(m))
    reason = check(analyze_run(run), "INCOMPLETE", "metrics.json disagrees", "max_abs_diff")
    assert "0.25" in reason and "step(s) 2" in reason


def test_tampered_verdict_is_a_mismatch(run):
    v = rj(run / "verdict.json")
    v["verdict"] = "FAIL_EQUIV"
    (run / "verdict.json").write_text(json.dumps(v))
    report = analyze_run(run)
    check(report, "INCOMPLETE", "verdict.json says FAIL_EQUIV", "PASS_EQUIV")
    assert report["verdict"] == "PASS_EQUIV" and report["stored_verdict"] == "FAIL_EQUIV"


def test_changed_logits_are_a_mismatch(run):
    a = npz(run)
    a["decode"][1, 7] += 1.0
    rewrite_npz(run, **a)
    report = analyze_run(run)
    check(report, "INCOMPLETE", "metrics.json disagrees", "bit_exact")
    check(report, "INCOMPLETE", "verdict.json says PASS_EQUIV", "FAIL_EQUIV")
    assert report["metrics"]["max_abs_diff"] == pytest.approx(1.0, rel=1e-3)


# --- broken logits ---------------------------------------------------------------------------------------
def test_truncated_npz(run):
    p = run / "logits.npz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    report = analyze_run(run)
    check(report, "MISSING_LOGITS", "logits.npz unreadable")
    assert report["metrics"] is None and report["verdict"] is None


def test_garbage_npz(run):
    (run / "logits.npz").write_bytes(b"not a zip file at all")
    check(analyze_run(run), "MISSING_LOGITS", "logits.npz unreadable")


def test_npz_missing_an_array(run):
    a = npz(run)
    del a["reference"]
    rewrite_npz(run, **a)
    check(analyze_run(run), "MISSING_LOGITS", "lacks array(s) reference", "decode")


def test_npz_missing_positions(run):
    a = npz(run)
    del a["positions"]
    rewrite_npz(run, **a)
    report = analyze_run(run)
    check(report, "INCOMPLETE", "lacks array 'positions'")
    assert report["metrics"] is None


def test_missing_logits(run):
    (run / "logits.npz").unlink()
    report = analyze_run(run)
    check(report, "MISSING_LOGITS", "logits.npz missing")
    assert report["stored_verdict"] == "PASS_EQUIV" and report["verdict"] is None
    metrics, note = metrics_for_plots(report, run)
    assert metrics == rj(run / "metrics.json") and "not verified" in note


def test_span_mismatch_between_arrays(run):
    a = npz(run)
    a["decode"] = a["decode"][:-1]
    rewrite_npz(run, **a)
    reason = check(analyze_run(run), "SPAN_MISMATCH", "decode logits", "reference logits", "differ in shape")
    assert "(3, 2048)" in reason and "(4, 2048)" in reason


def test_vocab_mismatch_between_arrays(run):
    a = npz(run)
    a["reference"] = a["reference"][:, :100]
    rewrite_npz(run, **a)
    check(analyze_run(run), "SPAN_MISMATCH", "(4, 100)")


def test_span_mismatch_vs_params(run):
    p = rj(run / "params.json")
    p["span"] = 8
    (run / "params.json").write_text(json.dumps(p))
    check(analyze_run(run), "SPAN_MISMATCH", "logits cover 4 steps", "params.json span is 8")


def test_logits_not_two_dimensional(run):
    a = npz(run)
    a["decode"] = a["decode"].reshape(-1)
    rewrite_npz(run, **a)
    check(analyze_run(run), "SPAN_MISMATCH", "decode logits have shape (8192,)")


def test_nan_logits_are_ok_with_fail_equiv(run):
    """The probe's own record of NaN logits (metrics and verdict written from them) checks out: OK, FAIL_EQUIV."""
    a = npz(run)
    a["decode"][2, 5] = np.nan
    a["decode"][2, 9] = np.inf
    a["decode"][3, 0] = np.nan
    rewrite_npz(run, **a)
    m = rj(run / "metrics.json")
    again = compare(a["decode"], a["reference"], a["tokens"].tolist(), a["positions"].tolist(),
                    [r["source"] for r in m["per_position"]])
    p = rj(run / "params.json")
    verdict, reason = equivalence_verdict(again, p["kv_aligned"], p["thresholds"])
    assert verdict == "FAIL_EQUIV"
    (run / "metrics.json").write_text(json.dumps(again))
    (run / "verdict.json").write_text(json.dumps({**rj(run / "verdict.json"), "verdict": verdict, "reason": reason}))
    report = analyze_run(run)
    reason = check(report, "OK", "non-finite logits", "decode: 3 of 8192 (2 NaN, 1 Inf)", "step(s) 2, 3")
    assert "first at step 2 vocab index 5" in reason and "reference" not in reason
    assert report["verdict"] == "FAIL_EQUIV" and report["metrics"]["finite"] is False


def test_nan_logits_under_a_pass_verdict(run):
    """NaN written into the logits after the fact: the stored PASS_EQUIV is not backed by the trace."""
    a = npz(run)
    a["reference"][0, :] = np.nan
    rewrite_npz(run, **a)
    report = analyze_run(run)
    check(report, "INCOMPLETE", "non-finite logits", "reference: 2048 of 8192 (2048 NaN, 0 Inf)", "step(s) 0")
    check(report, "INCOMPLETE", "verdict.json says PASS_EQUIV but the logits give FAIL_EQUIV")


# --- broken JSON and directories -------------------------------------------------------------------------
def test_missing_params(run):
    (run / "params.json").unlink()
    report = analyze_run(run)
    check(report, "INCOMPLETE", "params.json missing")
    assert report["metrics"] == rj(run / "metrics.json")  # the logits still check out
    assert report["verdict"] is None


@pytest.mark.parametrize("name", ["params.json", "metrics.json", "verdict.json"])
def test_invalid_json(run, name):
    (run / name).write_text('{"span": 4, "vocab":')
    check(analyze_run(run), "INCOMPLETE", f"{name} unreadable", "JSONDecodeError")


def test_json_that_is_not_an_object(run):
    (run / "params.json").write_text("[1, 2, 3]")
    check(analyze_run(run), "INCOMPLETE", "params.json is not a JSON object", "list")


def test_run_dir_that_does_not_exist(tmp_path):
    report = analyze_run(tmp_path / "no" / "such" / "run")
    check(report, "INCOMPLETE", "does not exist")
    assert report["metrics"] is None and report["verdict"] is None


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    check(analyze_run(tmp_path / "f"), "INCOMPLETE", "is not a directory")


@pytest.mark.parametrize("arg", [None, 42, "", "\x00bad"])
def test_nonsense_arguments_do_not_raise(arg):
    report = analyze_run(arg)
    assert report["status"] != "OK" and report["reasons"]


def test_fault_record(records, tmp_path):
    run = Path(shutil.copytree(records["oom"], tmp_path / "oom"))
    assert not (run / "logits.npz").exists() and not (run / "metrics.json").exists()
    report = analyze_run(run)
    reason = check(report, "INCOMPLETE", "fault record", "FAIL_OOM", "phase prefill", "no logits are expected")
    assert "complete record of that failure" in reason
    assert report["verdict"] == report["stored_verdict"] == "FAIL_OOM" and report["metrics"] is None
    assert "MISSING_LOGITS" not in report_md(report)
    assert metrics_for_plots(report, run)[0] == {}


# --- the notebook -------------------------------------------------------------------------------------------
def _execute_equivalence_notebook(run_dir: Path, out: Path) -> tuple[list, str]:
    from greta.reports.notebooks import NOTEBOOK_DIR, execute_notebook

    err = execute_notebook(NOTEBOOK_DIR / "equivalence_analysis.ipynb", out, {"run_dir": str(run_dir)}, timeout_s=120)
    assert err is None, err
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert nb.cells[-1].outputs, "the last cell ran"
    return outputs, "\n".join(o.get("data", {}).get("text/markdown", "") for o in outputs)


@pytest.mark.slow
def test_equivalence_notebook_on_a_truncated_trace(run):
    p = run / "logits.npz"
    p.write_bytes(p.read_bytes()[:100])
    outputs, text = _execute_equivalence_notebook(run, run / "equivalence_analysis.ipynb")
    assert "**MISSING_LOGITS**" in text and "logits.npz unreadable" in text
    assert "not verified against the logits" in text  # the plot falls back to metrics.json, flagged
    assert any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_equivalence_notebook_on_a_missing_run_dir(tmp_path):
    outputs, text = _execute_equivalence_notebook(tmp_path / "gone", tmp_path / "nb.ipynb")
    assert "**INCOMPLETE**" in text and "does not exist" in text
    assert "skipped" in text and not any("image/png" in o.get("data", {}) for o in outputs)
