"""The audit entry points end to end: `python -m greta audit` (papermill: the run notebook, the analysis
notebooks, HTML of each), notebooks/run_b3_77.ipynb run directly with papermill, a failing probe, and the
CLI's refusal of bad params."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greta.checks.verify import verify
from greta.reports import notebooks

NOTEBOOKS = ("run_b3_77", "vram_plot", "equivalence_analysis")
SMALL = ["-p", "ctx=512", "-p", "gen=8", "-p", "span=4", "-p", "prefill_chunk=128", "-p", "kv_block=128"]


def greta(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "greta", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def record_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/b3_77/*/params.json"))


def outputs(nb_path: Path) -> tuple[list[dict], str]:
    """(error outputs, all output text) of an executed notebook."""
    nb = json.loads(nb_path.read_text())
    errors, text = [], []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            if o["output_type"] == "error":
                errors.append(o)
            if "text" in o:
                text.append("".join(o["text"]))
            for v in o.get("data", {}).values():
                if isinstance(v, (str, list)):
                    text.append("".join(v))
    return errors, "\n".join(text)


def assert_executed(nb_path: Path) -> str:
    assert nb_path.is_file(), nb_path
    errors, text = outputs(nb_path)
    assert errors == [], [f"{e['ename']}: {e['evalue']}" for e in errors]
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{nb_path.name}: not every cell ran"
    return text


@pytest.mark.slow
def test_cli_audit_pass(tmp_path, repo_root, record_doc_files):
    r = greta(["audit", "-f", "params/cpu_default.yaml", *SMALL, "-o", str(tmp_path)], cwd=repo_root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("PASS_EQUIV")
    (d,) = record_dirs(tmp_path)
    assert f"record: {d}" in r.stdout
    missing = [f for f in record_doc_files if not (d / f).is_file()]
    missing += [f"{nb}.html" for nb in NOTEBOOKS if not (d / f"{nb}.html").is_file()]
    assert not missing
    for png in ("vram_plot.png", "equivalence.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for nb in NOTEBOOKS:
        assert_executed(d / f"{nb}.ipynb")
        assert (d / f"{nb}.html").stat().st_size > 1000
    run_text = assert_executed(d / "run_b3_77.ipynb")
    assert "PASS_EQUIV" in run_text
    assert "PASS_EQUIV" in (d / "report.md").read_text()
    v = json.loads((d / "verdict.json").read_text())
    assert v["verdict"] == "PASS_EQUIV" and v["bit_exact"] is True
    p = json.loads((d / "params.json").read_text())
    assert (p["ctx"], p["gen"], p["span"], p["prefill_chunk"], p["kv_block"]) == (512, 8, 4, 128, 128)
    assert verify(d) == []
    assert greta(["verify", str(d)], cwd=repo_root).returncode == 0
    assert_clean_stderr(r.stderr, progress=True)
    assert_pages(d, "PASS_EQUIV")


def assert_clean_stderr(stderr: str, progress: bool):
    """Nothing but progress bars (prefill, decode, reference, the notebooks) reaches stderr: no kernel warnings,
    no missing-alt warnings, no tqdm warnings, no tracebacks."""
    for noise in ("WARNING", "Alternative text", "TqdmWarning", "Traceback", "IProgress"):
        assert noise not in stderr, f"{noise!r} on stderr:\n{stderr[-2000:]}"
    if progress:
        for bar in ("prefill", "decode", "reference", "notebooks"):
            assert f"{bar}:" in stderr, f"no {bar} progress on stderr:\n{stderr[-2000:]}"
    else:
        assert stderr == ""


def assert_pages(d: Path, verdict: str):
    """Every notebook of the record has a page: the verdict first, no code, nothing from a network, small; and
    the stored notebooks keep at most one line of progress."""
    for nb in d.glob("*.ipynb"):
        page = nb.with_suffix(".html").read_text()
        assert page.index(verdict) < page.index('<div class="cell'), f"{nb.name}: the verdict is not first"
        assert '<strong class="verdict verdict-' in page, f"{nb.name}: the verdict is no badge"
        title = (d / "report.md").read_text().splitlines()[0].partition("— ")[2]  # as the page renders it
        assert page.count(title) == 1, f"{nb.name}: report.md shown {page.count(title)} times"
        assert str(d.parent.parent.parent) not in page, f"{nb.name}: the machine's path"
        assert "from greta" not in page and "import " not in page, f"{nb.name}: code shown"
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), f"{nb.name}: loads from a network"
        images = sum(len(m) for m in re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", page))
        assert len(page) - images <= 150_000, f"{nb.name}: {len(page) - images} bytes apart from images"
        assert "<img" not in page or 'alt="No description' not in page
        stderr_out = [o for c in json.loads(nb.read_text())["cells"] for o in c.get("outputs", [])
                      if o.get("name") == "stderr"]
        assert stderr_out == [], f"{nb.name}: stderr stored in the notebook"


@pytest.mark.slow
def test_papermill_run_notebook_directly(tmp_path, repo_root):
    import papermill as pm

    out = tmp_path / "executed.ipynb"
    root = tmp_path / "records"
    pm.execute_notebook(str(repo_root / "notebooks" / "run_b3_77.ipynb"), str(out), kernel_name="python3",
                        progress_bar=False,
                        parameters=dict(ctx=512, gen=8, span=4, overrides={"prefill_chunk": 128, "kv_block": 128},
                                        out_root=str(root)))
    text = assert_executed(out)
    assert "PASS_EQUIV" in text
    (d,) = record_dirs(root)
    assert json.loads((d / "verdict.json").read_text())["verdict"] == "PASS_EQUIV"
    p = json.loads((d / "params.json").read_text())
    assert (p["ctx"], p["prefill_chunk"], p["kv_block"]) == (512, 128, 128)
    for nb in NOTEBOOKS[1:]:
        assert_executed(d / f"{nb}.ipynb")
        assert (d / f"{nb}.html").is_file()
    # the record is complete: the executed run notebook and its page inside, sealed last
    assert_executed(d / "run_b3_77.ipynb") and (d / "run_b3_77.html").is_file()
    assert verify(d) == []


@pytest.mark.slow
def test_papermill_cli_from_the_notebooks_folder(tmp_path, repo_root):
    """`cd notebooks && papermill run_b3_77.ipynb out.ipynb -p ctx N`: the same complete, sealed record."""
    root = tmp_path / "records"
    r = subprocess.run([sys.executable, "-m", "papermill", "run_b3_77.ipynb", str(tmp_path / "out.ipynb"),
                        "-p", "ctx", "256", "-p", "gen", "8", "-p", "span", "4", "-p", "prefill_chunk", "64",
                        "-p", "kv_block", "128", "-p", "out_root", str(root)], cwd=repo_root / "notebooks",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (d,) = record_dirs(root)
    assert f"record: {Path(*d.parts[-3:])}" in outputs(tmp_path / "out.ipynb")[1]  # the page: no machine path
    v = json.loads((d / "verdict.json").read_text())  # papermill's terminal ends as `greta audit` does
    assert r.stdout.splitlines()[-2:] == [f"{v['verdict']}: {v['reason']}", f"record: {d}"], r.stdout
    for nb in NOTEBOOKS:
        assert_executed(d / f"{nb}.ipynb")
    assert_pages(d, "PASS_EQUIV")
    assert verify(d) == []
    assert not (repo_root / "notebooks" / "outputs").exists()


def interrupt_audit(tmp_path, repo_root, when: str, delay: float = 0.0) -> tuple[subprocess.CompletedProcess, Path]:
    """`greta audit --quiet` in its own session, as from a terminal; Ctrl-C (SIGINT to the whole process group)
    once the file `when` appears in the record directory, plus delay seconds."""
    args = [sys.executable, "-m", "greta", "audit", *SMALL, "-o", str(tmp_path), "--quiet"]
    p = subprocess.Popen(args, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(f"*/b3_77/*/{when}")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the audit ended before the interrupt"
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=240)
    (d,) = record_dirs(tmp_path)
    return subprocess.CompletedProcess(args, p.returncode, out, err), d


def assert_interrupted(r: subprocess.CompletedProcess, d: Path) -> dict:
    """Exit 130, one line on stderr, an INTERRUPTED record wherever a verdict shows, that verifies."""
    assert r.returncode == 130, r.stderr[-3000:]
    assert r.stderr.splitlines() == [f"greta: INTERRUPTED by SIGINT (Ctrl-C); record: {d}"], r.stderr[-3000:]
    v = json.loads((d / "verdict.json").read_text())
    assert v["verdict"] == "INTERRUPTED"
    assert "INTERRUPTED" in (d / "report.md").read_text()
    for nb in d.glob("*.ipynb"):
        assert "INTERRUPTED" in nb.with_suffix(".html").read_text(), nb.name
        if notebooks.is_complete(nb):
            continue
        first = json.loads(nb.read_text())["cells"][0]
        assert "did not run to completion" in "".join(first["source"]), f"{nb.name}: half-run, unmarked"
    assert verify(d) == []
    return v


@pytest.mark.slow
def test_ctrl_c_during_the_probe(tmp_path, repo_root):
    r, d = interrupt_audit(tmp_path, repo_root, "perf.json", delay=1.0)
    v = assert_interrupted(r, d)
    assert v["failed_phase"] in ("ceilings", "load", "prefill", "decode", "reference")


@pytest.mark.slow
def test_ctrl_c_during_the_analysis_notebooks(tmp_path, repo_root):
    """The probe has finished (PASS_EQUIV) when Ctrl-C comes: the record still says INTERRUPTED, naming the
    analysis notebook it found running, and no half-run notebook passes for a complete one."""
    r, d = interrupt_audit(tmp_path, repo_root, "vram_plot.ipynb", delay=0.3)
    v = assert_interrupted(r, d)
    assert v["failed_phase"] == "analysis" and "analysis notebook" in v["reason"]  # the step it found, named
    assert v["probe_verdict"] == "PASS_EQUIV"
    run_nb = d / "run_b3_77.ipynb"
    assert not notebooks.is_complete(run_nb)  # the run notebook stopped in its analysis cell: marked


@pytest.mark.slow
@pytest.mark.parametrize("fault,verdict", [("error:decode", "FAIL_ERROR"), ("oom:decode", "FAIL_OOM")])
def test_cli_audit_of_a_failing_probe(tmp_path, repo_root, fault, verdict):
    r = greta(["audit", "-p", "ctx=256", "-p", "gen=8", "-p", "span=4", "-p", "prefill_chunk=64", "-p",
               "kv_block=128", "-p", f"fault={fault}", "-o", str(tmp_path), "--quiet"], cwd=repo_root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert_clean_stderr(r.stderr, progress=False)  # --quiet: nothing at all
    assert r.stdout.startswith(verdict)
    (d,) = record_dirs(tmp_path)
    v = json.loads((d / "verdict.json").read_text())
    assert v["verdict"] == verdict and v["failed_phase"] == "decode"
    for nb in NOTEBOOKS:
        assert (d / f"{nb}.ipynb").is_file() and (d / f"{nb}.html").is_file(), nb
    # the run notebook completed (a failing probe doesn't raise) and shows the verdict in its outputs
    assert verdict in assert_executed(d / "run_b3_77.ipynb")
    assert verdict in outputs(d / "equivalence_analysis.ipynb")[1]
    assert verdict in (d / "report.md").read_text()
    assert verify(d) == []  # sealed after the notebooks: a complete record of a failure


@pytest.mark.parametrize("cmd", ["audit", "probe"])
@pytest.mark.parametrize("bad,key", [(["-p", "ctx=0"], "ctx"), (["-p", "ctx"], "ctx"),
                                     (["-p", "dtype=int8"], "dtype")])
def test_cli_bad_param_is_one_line_exit_2(tmp_path, repo_root, cmd, bad, key):
    r = greta([cmd, *bad, "-o", str(tmp_path)], cwd=repo_root, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("greta: error:") and key in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not any(tmp_path.iterdir())  # nothing was run or written


def test_cli_missing_params_file_exit_2(tmp_path, repo_root):
    r = greta(["probe", "-f", str(tmp_path / "nope.yaml"), "-o", str(tmp_path)], cwd=repo_root, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("greta: error:") and "nope.yaml" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_audit_from_another_directory(tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = greta(["audit", "-p", "ctx=256", "-p", "gen=8", "-p", "span=4", "-p", "prefill_chunk=64", "-p",
               "kv_block=128", "-o", str(tmp_path / "out"), "--quiet"], cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.startswith("PASS_EQUIV")
