"""A notebook kernel that dies mid-probe still leaves a complete FAIL_ERROR record; a disk that fills or turns
read-only while the record is completed ends in one line, never in a half-written file."""
import errno
import json
import os
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from greta import audit
from greta.record.params import load_params
from greta.checks.verify import verify
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


# --- a disk that fills or turns read-only while the audit completes its record (issue 24, D7) ---------------
@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A record as the audit's kernel leaves it: the probe's (sealed) and the run notebook, not yet completed."""
    from conftest import SMALL_PROBE
    from greta.probe.runner import run_probe

    params = load_params(CPU_PARAMS, SMALL_PROBE)
    d = run_probe(params, out_root=tmp_path_factory.mktemp("probed"), progress=False)
    nbformat.write(nbformat.read(notebooks.notebook_path("run_b3_77.ipynb"), as_version=4), d / "run_b3_77.ipynb")
    return d, params


def _failing_writes(monkeypatch, err: int, first: int, once: bool) -> list:
    """Every record write from the `first`-th on (or that one only) raises OSError(err), as the disk would."""
    import errno as _errno

    from greta.record import files

    real, calls = files.atomic_write_bytes, []

    def write(path, data):
        calls.append(Path(path).name)
        if len(calls) == first or (len(calls) > first and not once):
            raise OSError(err, os.strerror(err), str(path))
        real(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", write)
    assert err in (_errno.ENOSPC, _errno.EROFS)
    return calls


def _as_if_the_kernel_failed_in_decode(d: Path) -> RuntimeError:
    """The record as a kernel that failed during decode leaves it: perf.json checkpointed, no verdict yet."""
    for name in ("verdict.json", "metrics.json", "logits.npz", "report.md", "manifest.json"):
        (d / name).unlink()
    perf = json.loads((d / "perf.json").read_text())
    perf["decode"]["status"], perf["reference"] = "running", {"status": "not_run"}
    (d / "perf.json").write_text(json.dumps(perf))
    return RuntimeError("RecordError: could not finish the record (No space left on device)")


def _complete(probed, tmp_path, monkeypatch, err, first, once, interrupted=None):
    from greta.record.store import RecordError

    src, params = probed
    d = tmp_path / src.name
    shutil.copytree(src, d)
    failed = _as_if_the_kernel_failed_in_decode(d) if interrupted == "mid-probe" else None
    interrupted = None if interrupted == "mid-probe" else interrupted
    calls = _failing_writes(monkeypatch, err, first, once)
    try:
        audit.complete_or_say_what_was_lost(d, params, failed, interrupted, False, [])
        line = None
    except RecordError as e:
        line = str(e)
    monkeypatch.undo()
    return d, line, calls


@pytest.mark.parametrize("interrupted", [None, "SIGINT (Ctrl-C)", "mid-probe"])
@pytest.mark.parametrize("err,once", [(errno.ENOSPC, False), (errno.ENOSPC, True), (errno.EROFS, False)])
def test_a_write_failing_at_each_stage_of_completing_the_record(probed, tmp_path, monkeypatch, err, once, interrupted):
    """One line naming the file and what became of the record; the record either verifies (sealed) or has no
    manifest that passes it; no temp file, no half-written notebook or page; each write stage in turn: after
    a finished probe, after an interrupt (verdict.json and report.md rewritten), and after a kernel that
    failed mid-probe (the FAIL_ERROR record written from its checkpoint)."""
    _, _, calls = _complete(probed, tmp_path / "count", monkeypatch, err, 10**6, False, interrupted)
    stages = len(calls)
    assert stages >= 3, calls  # the banner, the page, the seal at least (INTERRUPTED: verdict.json, report.md too)
    for first in range(1, stages + 1):
        d, line, _ = _complete(probed, tmp_path / str(first), monkeypatch, err, first, once, interrupted)
        assert line is not None and "\n" not in line and os.strerror(err) in line, (first, line)
        assert not list(d.glob(".*")), (first, [p.name for p in d.glob(".*")])
        for f in [*d.glob("*.ipynb"), *d.glob("*.json")]:
            json.loads(f.read_text())  # whole, never truncated
        problems = verify(d)
        if (d / "manifest.json").is_file() and "verifies" in line:
            assert problems == [], (first, problems)
        else:
            assert problems, (first, line)  # not taken for complete
            assert ("left without manifest.json" in line) == (not (d / "manifest.json").exists()), line
