"""A notebook kernel that dies mid-probe still leaves a complete FAIL_ERROR record."""
import json
import time

import nbformat

from greta import audit
from greta.record.params import load_params
from greta.reports import notebooks

CPU_PARAMS = notebooks.REPO_ROOT / "params" / "cpu_default.yaml"


def run_audit(params_file, overrides, out_root):
    """The audit of params_file + overrides (run_audit moved to greta.audit and takes validated params)."""
    return audit.run_audit(load_params(params_file, overrides), out_root=out_root, progress=False)


def test_kernel_death_before_the_probe_leaves_a_fail_error_record(tmp_path, monkeypatch):
    def dead_kernel(src, out, parameters, timeout_s=None):
        nbformat.write(nbformat.read(src, as_version=4), out)  # papermill keeps the partial notebook
        return RuntimeError("DeadKernelError: Kernel died")

    monkeypatch.setattr(notebooks, "execute_notebook", dead_kernel)
    run_dir = run_audit(CPU_PARAMS, {"ctx": 256}, out_root=tmp_path)
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["verdict"] == "FAIL_ERROR" and "Kernel died" in verdict["reason"]
    assert "FAIL_ERROR" in (run_dir / "report.md").read_text()
    assert (run_dir / "run_b3_77.ipynb").is_file() and (run_dir / "run_b3_77.html").is_file()


def test_a_real_kernel_death_mid_probe(tmp_path):
    """The worker SIGKILLs its parent, the notebook kernel, during decode: papermill sees a dead kernel and
    marks the rest of the notebook as run. The record still says what happened, with what was measured."""
    import psutil

    from greta.record.params import PHASES
    from greta.checks.verify import verify
    from greta.record.samples import read_samples_csv

    from conftest import SMALL_PROBE

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    run_dir = run_audit(CPU_PARAMS, {**SMALL_PROBE, "fault": "kernel_death:decode"}, out_root=tmp_path)
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["verdict"] == "FAIL_ERROR" and verdict["failed_phase"] == "decode"
    assert "kernel died" in verdict["reason"]
    perf = json.loads((run_dir / "perf.json").read_text())
    assert [perf[ph]["status"] for ph in PHASES] == ["ok", "ok", "ok", "crash", "not_run"]
    assert perf["prefill"]["wall_s"] > 0
    assert any(s["phase"] == "decode" for s in read_samples_csv(run_dir / "vram_samples.csv"))
    nb = nbformat.read(run_dir / "run_b3_77.ipynb", as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "FAIL_ERROR" in nb.cells[0].source
    assert "FAIL_ERROR" in (run_dir / "run_b3_77.html").read_text()
    assert "FAIL_ERROR" in (run_dir / "report.md").read_text()
    assert verify(run_dir) == []
    time.sleep(1)  # the worker dies with its parent (PR_SET_PDEATHSIG)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    worker = json.loads((run_dir / "metadata.json").read_text())["worker_pid"]
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
