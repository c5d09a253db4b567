"""Nothing left behind, and progress that ends where it says.

An audit, normal or interrupted (Ctrl-C, SIGTERM), leaves no file in $TMPDIR: no notebook kernel's connection
file (it holds the kernel's HMAC key), no figure folder. Every phase's progress bar ends at 100%, or at what it
counted with how the phase ended. (The test suite as a whole is checked by tests/conftest.py.)
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from greta.checks.verify import verify
from greta.probe.runner import run_probe
from greta.record.params import PHASES
from greta.reports import notebooks

from conftest import CPU_PARAMS, SMALL_PROBE

SMALL = [a for k, v in SMALL_PROBE.items() for a in ("-p", f"{k}={v}")]


def fresh_tmpdir(tmp_path: Path) -> Path:
    d = tmp_path / "TMPDIR"
    d.mkdir()
    return d


# --- the suite's own check (tests/conftest.py) ----------------------------------------------------------
LEAKY_TESTS = """
import tempfile

def test_tidy(tmp_path):
    (tmp_path / "kept").write_text("pytest's tmp_path is allowed")
    with tempfile.TemporaryDirectory():
        pass

def test_leaks():
    tempfile.mkstemp(prefix="leaked-", suffix=".json")

def test_cleans_up_at_exit():  # under xdist: in a worker, whose exit comes before the check
    import atexit, shutil
    atexit.register(shutil.rmtree, tempfile.mkdtemp(prefix="until-exit-"))
"""


@pytest.mark.parametrize("workers", [["-k", "not at_exit"], ["-n", "2"]], ids=["one-process", "xdist"])
def test_the_session_fails_when_a_test_leaves_a_file_in_tmpdir(tmp_path, repo_root, workers):
    """A session of this suite's conftest.py: a test that leaves a file in $TMPDIR (in an xdist worker too)
    fails the session, which names that file and only it (under xdist: checked after the workers' exit
    handlers ran); the same session without it passes (in one process: that part does not depend on xdist)."""
    (tmp_path / "conftest.py").write_text((repo_root / "tests" / "conftest.py").read_text())
    (tmp_path / "test_it.py").write_text(LEAKY_TESTS)

    def session(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                               str(tmp_path / "basetemp"), *workers, *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    r = session()
    assert r.returncode == 1 and "passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
    assert re.search(r"left 1 file\(s\) in its TMPDIR .*\n\s+leaked-\w+\.json\n", r.stdout), r.stdout[-2000:]
    if "-n" in workers:
        return
    r = session("-k", "tidy")
    assert r.returncode == 0 and "left" not in r.stdout, r.stdout[-2000:]


# --- kernels --------------------------------------------------------------------------------------------
@pytest.fixture
def one_cell_notebook(tmp_path) -> Path:
    src = tmp_path / "one.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1 + 1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, src)
    return src


def test_a_notebook_run_removes_its_kernel_connection_file(tmp_path, monkeypatch, one_cell_notebook):
    """The kernel's connection file is written to $TMPDIR; execute_notebook removes it. Control: with the
    manager's stop skipped (papermill handed a manager does not stop it), the file stays, and the check sees it."""
    import tempfile

    tmp = fresh_tmpdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where jupyter_client writes the connection file
    assert notebooks.execute_notebook(one_cell_notebook, tmp_path / "out.ipynb", {}) is None
    assert list(tmp.iterdir()) == []

    made, real_manager = [], notebooks._kernel_manager

    def leaky_manager():
        km = real_manager()
        made.append((km, km.stop))
        km.stop = lambda now: None
        return km

    monkeypatch.setattr(notebooks, "_kernel_manager", leaky_manager)
    assert notebooks.execute_notebook(one_cell_notebook, tmp_path / "out2.ipynb", {}) is None
    try:
        assert [p.suffix for p in tmp.iterdir()] == [".json"]  # the control: what the check above would catch
    finally:
        km, stop = made[0]
        stop(now=True)
    assert list(tmp.iterdir()) == []


# --- progress -------------------------------------------------------------------------------------------
def progress_lines(path: Path) -> dict[str, list[str]]:
    """The last progress line of each phase: {phase: [done, total, unit, (how it ended)]}."""
    last = {}
    for line in path.read_text().splitlines():
        kind, phase, *rest = line.split()
        if kind == "phase":
            last[phase] = rest
    return last


def test_every_phase_reports_its_end(tmp_path, monkeypatch, small_params):
    """What the probe tells the audit's progress display: every phase's last line is done == total (ceilings
    and load, which count no steps, as 1/1); a phase that fails (here the last one) says so, at what it had
    counted."""
    path = tmp_path / "progress"
    monkeypatch.setenv(notebooks.PROGRESS_ENV, str(path))
    run_probe(small_params(fault="error:reference"), out_root=tmp_path, progress=True)
    last = progress_lines(path)
    assert list(last) == list(PHASES)
    ok = {ph: last.pop(ph) for ph in PHASES[:-1]}
    assert all(len(f) == 3 and f[0] == f[1] != "0" for f in ok.values()), ok
    assert (ok["prefill"][2], ok["decode"][2], ok["decode"][1]) == ("pos", "tok", str(SMALL_PROBE["gen"]))
    assert last["reference"][-1] == "error" and last["reference"][0] != last["reference"][1], last


def last_frames(stderr: str) -> dict[str, str]:
    """The last frame each tqdm bar drew on a terminal: {its label: the frame}."""
    last = {}
    for frame in re.split(r"[\r\n]", stderr):
        m = re.match(r"\s*([\w ]+):\s+\d+%\|", frame)
        if m:
            last[m.group(1)] = frame.strip()
    return last


def ends_complete(frame: str) -> bool:
    m = re.search(r"(\d+)%\|[^|]*\| (\d+)/(\d+) ", frame)
    return bool(m) and m.group(1) == "100" and m.group(2) == m.group(3)


def test_the_bar_check_fails_on_a_bar_left_at_zero():
    """The control of the check below, on frames as the audit drew them before (ceilings left at 0/1)."""
    old = ("\rceilings:   0%|          | 0/1 [00:00<?, ?step/s]\rceilings:   0%|          | 0/1 [00:04<?, ?step/s]\n"
           "\rdecode: 100%|##########| 8/8 [00:00<00:00, 39.95tok/s]\n")
    frames = last_frames(old)
    assert set(frames) == {"ceilings", "decode"}
    assert not ends_complete(frames["ceilings"]) and ends_complete(frames["decode"])


# --- audits ---------------------------------------------------------------------------------------------
def audit(out_root: Path, tmp: Path, *extra: str) -> subprocess.Popen:
    """`greta audit` of a small CPU probe in its own session (as from a terminal), with TMPDIR = tmp."""
    args = [sys.executable, "-m", "greta", "audit", "-f", str(CPU_PARAMS), *SMALL, "-o", str(out_root), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_an_audit_leaves_nothing_in_tmpdir_and_every_bar_ends(tmp_path):
    tmp = fresh_tmpdir(tmp_path)
    p = audit(tmp_path / "out", tmp)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert out.startswith("PASS_EQUIV")
    assert list(tmp.iterdir()) == []
    frames = last_frames(err)
    assert set(frames) == {*PHASES, "notebooks"}, err[-3000:]
    assert [f for f in frames.values() if not ends_complete(f)] == []


@pytest.mark.slow
@pytest.mark.parametrize("sig,when,delay", [
    (signal.SIGINT, "perf.json", 1.0),  # during the probe
    (signal.SIGTERM, "vram_plot.ipynb", 0.0),  # as the first analysis notebook's kernel starts
], ids=["sigint-in-the-probe", "sigterm-as-an-analysis-kernel-starts"])
def test_an_interrupted_audit_leaves_nothing_in_tmpdir(tmp_path, sig, when, delay):
    tmp, out_root = fresh_tmpdir(tmp_path), tmp_path / "out"
    p = audit(out_root, tmp, "--quiet")
    deadline = time.monotonic() + 240
    while not list(out_root.glob(f"*/b3_77/*/{when}")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the audit ended before the interrupt"
    time.sleep(delay)
    os.killpg(p.pid, sig)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 130, err[-3000:]
    (d,) = [q.parent for q in out_root.glob("*/b3_77/*/manifest.json")]
    assert json.loads((d / "verdict.json").read_text())["verdict"] == "INTERRUPTED"
    assert verify(d) == []
    assert list(tmp.iterdir()) == []
