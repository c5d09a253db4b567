"""The notebooks refuse papermill parameters they cannot honour (issue 20): a name the parameters cell does not
declare stops the run at papermill's injected cell, in one line naming it and the closest declared name in
papermill's syntax, before anything runs; the run notebooks take every param the CLI takes."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import nbformat
import pytest

from greta.record.params import Params, ParamError
from greta.reports.notebook_params import InjectedCellCheck, check_injected, declared_parameters, papermill_syntax

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
RUN_NOTEBOOKS = ("run_b3_77.ipynb", "batch_probe.ipynb", "tp_invariance_probe.ipynb")
NOTEBOOK_ONLY = {"params_file", "overrides", "out_root", "run_dir", "show_code"}


def parameters_cell(name: str) -> str:
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell.source


def refusal(source: str, name: str = "run_b3_77.ipynb") -> str:
    with pytest.raises(ParamError) as e:
        check_injected(source, declared_parameters(parameters_cell(name)) if name.endswith(".ipynb") else {})
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# --- the notebooks as committed ------------------------------------------------------------------------------
def test_all_nine_notebooks_are_covered():
    assert NOTEBOOKS == ["batch_probe.ipynb", "equivalence_analysis.ipynb", "reproduce.ipynb", "run_b3_77.ipynb",
                         "sweep.ipynb", "sweep_report.ipynb", "tp_heatmap.ipynb", "tp_invariance_probe.ipynb",
                         "vram_plot.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_parameters_cell_guards_and_papermill_sees_the_same_names(name):
    """The guard is installed first thing in the parameters cell; papermill's own reading of that cell (its
    --help-notebook and its "unknown parameter" warning) finds exactly the names the guard allows."""
    from papermill.translators import PythonTranslator

    src = parameters_cell(name)
    first = [ln for ln in src.splitlines() if ln.strip()][:2]
    assert first == ["from greta.reports.notebook_params import guard_parameters", first[1]], first
    assert first[1].startswith("guard_parameters()") and "=" not in first[1]
    seen = {p.name for p in PythonTranslator.inspect(nbformat.v4.new_code_cell(src))}
    assert seen == set(declared_parameters(src)) and seen


@pytest.mark.parametrize("name", RUN_NOTEBOOKS)
def test_run_notebooks_take_every_param_the_cli_takes(name):
    """Every top-level param (-p key=... on the CLI) is a parameter of both run notebooks and is handed to
    notebook_params by name; a dotted CLI key goes in as its section's mapping (-y 'timeouts: {decode: 60}')."""
    top = {f.name for f in fields(Params)}
    assert set(declared_parameters(parameters_cell(name))) == top | NOTEBOOK_ONLY
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    (call,) = [n for c in nb.cells if c.cell_type == "code" and "notebook_params(" in c.source
               for n in ast.walk(ast.parse(c.source)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "notebook_params"]
    assert {k.arg for k in call.keywords} == top
    assert all(isinstance(k.value, ast.Name) and k.value.id == k.arg for k in call.keywords)


# --- the check ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell,words", [
    ("ctxx = 512", ["'ctxx'", "did you mean -p ctx 512?"]),
    ('perturbb = "rope_offset"', ["'perturbb'", "-p perturb rope_offset"]),
    ("CTX = 512", ["'CTX'", "-p ctx 512"]),
    ("timeouts.decode = 60", ["timeouts.decode", "-y 'timeouts: {decode: 60}'"]),
    ("ctx-x = 5", ["'ctx-x'", "-p ctx 4096"]),  # not Python at all: read line by line
    ("ctx = None", ["ctx None", "keep the params file's value", "-p ctx 4096"]),
    ('ctxx = "\\x1b[2J"', ["'ctxx'", "-p ctx 4096"]),  # a control character is not echoed back
])
def test_injected_names_the_notebook_cannot_honour_are_refused(cell, words):
    msg = refusal(f"# Parameters\n{cell}\n")
    assert all(w in msg for w in words), msg
    assert "=4096" not in msg and "\x1b" not in msg


def test_declared_names_pass_and_other_cells_are_not_checked():
    declared = declared_parameters(parameters_cell("run_b3_77.ipynb"))
    check_injected("# Parameters\nctx = 512\nparams_file = None\nrun_dir = None\noverrides = {'a': 1}\n", declared)
    check = InjectedCellCheck(declared)
    assert check(["ctxx = 1\n"]) == ["ctxx = 1\n"]  # without papermill's header: a cell of the notebook's own
    with pytest.raises(ParamError):
        check(["# Parameters\n", "ctxx = 1\n"])
    assert "'rows'" in refusal("# Parameters\nrows = [1]\n", "vram_plot.ipynb")  # each notebook its own names
    assert "did you mean -p matrix_file 1?" in refusal("# Parameters\nmatrix = 1\n", "sweep.ipynb")
    assert "did you mean" not in refusal("# Parameters\nctx = 1\n", "no_parameters")


@pytest.mark.parametrize("cli,papermill", [
    ("param ctx=-5 must be between 1 and 2147483647; e.g. -p ctx=4096",
     "param ctx=-5 must be between 1 and 2147483647; e.g. -p ctx 4096"),
    ("e.g. -p timeouts.decode=600.0", "e.g. -y 'timeouts: {decode: 600.0}'"),
    ("use -p tokenizer=<dir with tokenizer.json>, or use -p prompt=synthetic",
     "use -p tokenizer <dir with tokenizer.json>, or use -p prompt synthetic"),
    ("e.g. -p batch_lengths=", "e.g. -p batch_lengths ''"),
    ("write -p device=cuda (or cpu)", "write -p device cuda (or cpu)"),
    ("e.g. -p batch_gen=64,64; or", "e.g. -p batch_gen 64,64; or"),
    ("lower -p span or raise -p gen", "lower -p span or raise -p gen"),
])
def test_cli_hints_become_papermill_hints(cli, papermill):
    assert papermill_syntax(cli) == papermill


# --- in a kernel ------------------------------------------------------------------------------------------------
def test_the_guard_stops_papermills_cell_before_it_runs_in_ipython():
    """Through IPython itself (as a kernel runs cells): the parameters cell installs the check once however
    often it runs; papermill's cell with an unknown name fails before it is executed (nothing assigned) and
    shows one line; a cell that is not papermill's passes."""
    code = textwrap.dedent(f"""
        import json
        from IPython.core.interactiveshell import InteractiveShell
        from greta.reports.notebook_params import InjectedCellCheck
        ip = InteractiveShell.instance()
        cell = json.load(open({str(REPO / "notebooks" / "run_b3_77.ipynb")!r}))["cells"][1]
        src = "".join(cell["source"])
        assert ip.run_cell(src).success and ip.run_cell(src).success
        assert sum(isinstance(t, InjectedCellCheck) for t in ip.input_transformers_cleanup) == 1
        bad = ip.run_cell("# Parameters\\nctx = 512\\nctxx = 512\\n")
        print("REFUSED", type(bad.error_before_exec).__name__, ip.user_ns["ctx"], "ctxx" in ip.user_ns)
        assert ip.run_cell("# Parameters\\nctx = 512\\n").success and ip.user_ns["ctx"] == 512
        assert ip.run_cell("ctxx = 1").success
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED ParamError None False" in r.stdout, r.stdout
    assert ("greta: error: papermill parameter 'ctxx' is not a parameter of this notebook; did you mean -p ctx 512?"
            in r.stdout), r.stdout


def papermill_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "papermill", str(REPO / "notebooks" / "run_b3_77.ipynb"),
                           str(tmp_path / "out.ipynb"), "--no-progress-bar", "-p", "out_root", str(tmp_path / "rec"),
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def test_papermill_cli_refuses_a_misspelt_name_before_anything_runs(tmp_path):
    """`papermill run_b3_77.ipynb o.ipynb -p ctxx 512` fails on its one line; no record is written and no cell
    after papermill's ran."""
    r = papermill_cli(["-p", "ctxx", "512"], tmp_path)
    assert r.returncode != 0
    assert last_line(r.stderr) == ("greta: error: papermill parameter 'ctxx' is not a parameter of this notebook; "
                                   "did you mean -p ctx 512? (papermill --help-notebook lists them)"), r.stderr[-2000:]
    assert not (tmp_path / "rec").exists()
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    (i,) = [i for i, c in enumerate(cells) if "injected-parameters" in c["metadata"].get("tags", [])]
    assert [o["output_type"] for o in cells[i]["outputs"]] == ["error"]
    assert all(c.get("execution_count") is None for c in cells[i + 1:] if c["cell_type"] == "code")


@pytest.mark.slow  # 17 s; the fast tests of test_params_parsing.py read papermill's values with its own converter
def test_papermill_cli_values_are_read_as_the_cli_reads_them(tmp_path):
    """papermill hands -p ctx 0256 over as 256 and -p batch_lengths 300 as 300: the notebook reads them as
    `-p ctx=0256 -p batch_lengths=300` on the CLI (ctx 256, then 300 past it), with a papermill-syntax hint."""
    r = papermill_cli(["-p", "ctx", "0256", "-p", "probe", "batch", "-p", "batch_lengths", "300"], tmp_path)
    assert r.returncode != 0
    assert last_line(r.stderr) == ("greta: error: param batch_lengths='300': 300 is not between 1 and 256; "
                                   "e.g. -p batch_lengths 256"), r.stderr[-2000:]
    assert not (tmp_path / "rec").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_refuses_an_unknown_parameter(tmp_path, name):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(REPO / "notebooks" / name), str(tmp_path / "out.ipynb"), parameters={"bogus_name": 1},
                            progress_bar=False, kernel_name="python3", cwd=str(REPO))
    assert "greta: error: papermill parameter 'bogus_name' is not a parameter of this notebook" in str(e.value)
