"""The tables and helpers that several modules share, defined once: verdict groups, the phase-status ->
verdict table and its inverse, the record's file list, the verdict.json dict, the VRAM floor of a run,
the interrupt payload and the fault record that run_audit writes when the probe leaves none."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from greta.checks import analyze
from greta.record import metrics
from greta.reports import notebooks
from greta.record import params
from greta.probe import runner as probe
from greta.record import store as record
from greta.checks import verify
from greta.record import samples as vram

from conftest import CPU_PARAMS


def test_verdict_groups_are_defined_once():
    assert metrics.VERDICTS == ("PASS_EQUIV", "FAIL_EQUIV", "EXPECTED_DRIFT", "ENGINE_DRIFT", "FAIL_OOM", "FAIL_TIMEOUT",
                                "FAIL_ERROR", "INTERRUPTED")
    assert metrics.VERDICTS == metrics.EQUIV_VERDICTS + metrics.FAULT_VERDICTS
    assert analyze.FAULT_VERDICTS is metrics.FAULT_VERDICTS
    assert probe.FAIL is metrics.FAIL and probe.PHASES is params.PHASES
    assert probe.FAIL == {"timeout": "FAIL_TIMEOUT", "oom": "FAIL_OOM", "crash": "FAIL_ERROR", "error": "FAIL_ERROR",
                          "interrupted": "INTERRUPTED"}


def test_fault_status_is_the_inverse_of_fail():
    assert verify.FAULT_STATUS == {"FAIL_TIMEOUT": {"timeout"}, "FAIL_OOM": {"oom"}, "FAIL_ERROR": {"error", "crash"},
                                   "INTERRUPTED": {"interrupted"}}


def test_verify_does_not_import_torch():
    code = "import sys, greta.checks.verify, greta.record.metrics, greta.checks.analyze; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_record_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.json", "a.txt", "sub/c.png", "manifest.json", ".a.json.123abc.tmp", "sub/.hidden"):
        (tmp_path / name).write_text("x")
    files = record.record_files(tmp_path)
    assert list(files) == ["a.txt", "b.json", "sub/c.png"]
    assert files["sub/c.png"] == tmp_path / "sub" / "c.png"


def test_seal_and_verify_cover_the_same_files(tmp_path):
    p = {"kv_aligned": 1, "perturb": "none"}
    (tmp_path / "params.json").write_text(json.dumps(p))
    (tmp_path / "notes.txt").write_text("x")
    record.seal(tmp_path, p)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert list(man["files"]) == list(record.record_files(tmp_path))
    manifest, errors = verify._check_manifest(tmp_path, False)
    assert manifest == man and errors == []
    (tmp_path / "later.txt").write_text("y")
    assert verify._check_manifest(tmp_path, False)[1] == ["later.txt is not in the manifest (added after sealing)"]


def test_verdict_record():
    p = params.load_params(None, {"kv_aligned": 0, "perturb": "rope_offset"})
    assert record.verdict_record(p, "FAIL_OOM", "prefill: oom", "prefill") == {
        "verdict": "FAIL_OOM", "reason": "prefill: oom", "failed_phase": "prefill", "bit_exact": None,
        "kv_aligned": 0, "perturb": "rope_offset", "tokens": None}
    v = record.verdict_record(p, "EXPECTED_DRIFT", "r", None, {"bit_exact": False}, [1, 2])
    assert v["bit_exact"] is False and v["tokens"] == [1, 2] and v["failed_phase"] is None


def test_floor_for(small_params, tiny_cfg):
    p = small_params()
    assert vram.floor_for(p, tiny_cfg) == vram.floor_mb(tiny_cfg, params.dtype_bytes(p.dtype), p.ctx + p.gen)


@pytest.mark.parametrize("exc,how", [(probe._Term(), "SIGTERM"), (KeyboardInterrupt(), "SIGINT (Ctrl-C)")])
def test_interrupt_payload(exc, how):
    assert probe._interrupted(exc, "decode") == (how, {"error": f"interrupted by {how} during decode; worker killed"})


def test_fault_record_of_an_interrupted_phase(tmp_path, small_params):
    p = small_params()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    perf = {"ceilings": {"status": "ok", "wall_s": 1.0}, "load": {"status": "running", "timeout_s": 600}}
    (run_dir / "perf.json").write_text(json.dumps(perf))
    (run_dir / "params.json").write_text(json.dumps(p.to_dict(), indent=2) + "\n")  # the probe made its record
    probe.finish_from_checkpoint(run_dir, p, "interrupted", "the audit was interrupted by SIGINT (Ctrl-C)")
    v = json.loads((run_dir / "verdict.json").read_text())
    # the probe's own record writer: its reasons start with the failed phase
    reason = "load: the audit was interrupted by SIGINT (Ctrl-C)"
    assert v == {"verdict": "INTERRUPTED", "reason": reason, "failed_phase": "load", "bit_exact": None,
                 "kv_aligned": p.kv_aligned, "perturb": p.perturb, "tokens": None}
    perf = json.loads((run_dir / "perf.json").read_text())
    assert [perf[ph]["status"] for ph in params.PHASES] == ["ok", "interrupted", "not_run", "not_run", "not_run"]
    assert perf["load"]["error"] == reason.removeprefix("load: ")
    for name in ("params.json", "metadata.json", "perf.json", "vram.json", "verdict.json"):  # same format as before
        text = (run_dir / name).read_text()
        assert text == json.dumps(json.loads(text), indent=2) + "\n"
    assert json.loads((run_dir / "params.json").read_text()) == p.to_dict()
    assert (run_dir / "vram_samples.csv").is_file() and vram.read_samples_csv(run_dir / "vram_samples.csv") == []
    assert "INTERRUPTED" in (run_dir / "report.md").read_text()  # the probe's own report.md
    vs = json.loads((run_dir / "vram.json").read_text())
    assert vs["floor"]["total_mb"] is not None and vs["samples_count"] == 0


def test_fault_record_of_a_kernel_that_died_before_the_probe(tmp_path, small_params):
    """No params.json, no perf.json: the record is created, and the fault charged to the first phase, which
    never ran, with a reason saying so; it verifies."""
    p = small_params()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    probe.finish_from_checkpoint(run_dir, p, "crash", "the notebook kernel died (x)")
    v = json.loads((run_dir / "verdict.json").read_text())
    assert v["verdict"] == "FAIL_ERROR" and v["failed_phase"] == "ceilings"
    assert v["reason"] == "ceilings: the notebook kernel died (x) before the probe started"
    perf = json.loads((run_dir / "perf.json").read_text())
    assert [perf[ph]["status"] for ph in params.PHASES] == ["crash", "not_run", "not_run", "not_run", "not_run"]
    assert verify.verify(run_dir) == []


def test_interrupted_audit_leaves_an_interrupted_record(tmp_path, monkeypatch):
    def interrupted(src, out, parameters, timeout_s=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(notebooks, "execute_notebook", interrupted)
    from greta.audit import run_audit

    with pytest.raises(probe.ProbeInterrupted) as e:
        run_audit(params.load_params(CPU_PARAMS, {"ctx": 256}), out_root=tmp_path, progress=False)
    run_dir = e.value.run_dir
    v = json.loads((run_dir / "verdict.json").read_text())
    assert v["verdict"] == "INTERRUPTED" and "interrupted by SIGINT (Ctrl-C)" in v["reason"]
    assert (run_dir / "manifest.json").is_file()
