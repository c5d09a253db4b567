"""Sweeps (greta/sweep.py, greta/sweep_report.py): a real tiny CPU sweep (the CI sweep: params/cpu_sweep.yaml,
2 ctx x 2 kv_aligned), resume, failing points, the guardrail on hand-made rows, the report and its HTML."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from greta.__main__ import main
from greta.record.params import ParamError
from greta.sweeps.sweep import SweepError, load_matrix, point_complete, points, read_config, run_sweep
from greta.reports import sweep_b3_77 as s77
from greta.sweeps import report as sr

REPO = Path(__file__).resolve().parent.parent
CPU_SWEEP = REPO / "params" / "cpu_sweep.yaml"


@pytest.fixture(scope="module")
def cpu_sweep(tmp_path_factory):
    """The CI sweep through the CLI: (exit code, sweep dir, stdout)."""
    import contextlib
    import io

    out_root = tmp_path_factory.mktemp("sweeps")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["sweep", "-f", str(CPU_SWEEP), "-o", str(out_root), "--quiet"])
    dirs = list(out_root.glob("*/b3_77-sweep/*"))
    assert len(dirs) == 1, dirs
    return rc, dirs[0], buf.getvalue()


# ------------------------------------------------------------------------ the real sweep
def test_cpu_sweep_records_every_point(cpu_sweep):
    rc, d, out = cpu_sweep
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["axes"] == {"ctx": [256, 512], "kv_aligned": [0, 1], "seed": [0], "dtype": ["bfloat16"]}
    assert cfg["base"]["model"] == "tiny" and "ctx" not in cfg["base"]
    names = cfg["points"]
    assert names == [p["name"] for p in points(cfg["axes"])] and len(names) == 4
    assert "ctx512-kv1-seed0-bfloat16" in names
    for n in names:
        ok, reasons = point_complete(d / "points" / n)
        assert ok, (n, reasons)
        params = json.loads((d / "points" / n / "params.json").read_text())
        assert (params["ctx"], params["kv_aligned"], params["gen"]) == (int(n[3:6]), int(n.split("-kv")[1][0]), 8)
        verdict = json.loads((d / "points" / n / "verdict.json").read_text())["verdict"]
        assert verdict == ("PASS_EQUIV" if params["kv_aligned"] else "EXPECTED_DRIFT"), n
    sv = json.loads((d / "sweep_verdict.json").read_text())
    assert sv["verdict"] == "PASS_GUARDRAIL" and rc == 0
    assert out.startswith("PASS_GUARDRAIL") and str(d) in out
    assert set(sv["points"]) == set(names) and sv["report_error"] is None
    log = [json.loads(x) for x in (d / "sweep_log.jsonl").read_text().splitlines()]
    assert [e["action"] for e in log] == ["ran"] * 4


def test_cpu_sweep_report_html(cpu_sweep):
    _, d, _ = cpu_sweep
    nb = nbformat.read(d / "sweep_report.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    for name in s77.PLOTS:
        p = d / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10000, name
    html = (d / "sweep_report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= len(s77.PLOTS)
    assert not re.search(r'<img[^>]+src="(?!data:)', html)  # nothing the page has to fetch
    # no input cells: every code cell is rendered without its input, and no source text leaks
    # (the one exporter, greta.reports.notebooks.to_html: nbconvert's basic template, whose code cells are
    # "code_cell" and whose input areas are "input")
    code_cells = re.findall(r'class="cell border-box-sizing code_cell[^"]*"', html)
    assert code_cells and not re.search(r'class="input(_area)?"', html)
    assert "sr.collect" not in html and "plot_vram_vs_ctx" not in html and "In&nbsp;[" not in html
    assert "| Context | KV |" not in html  # the table is rendered as HTML, not markdown source
    assert "<th>Context</th>" in html and "PASS_GUARDRAIL" in html and "ctx512-kv1-seed0-bfloat16" in html


def test_resume_skips_complete_and_moves_a_damaged_point_aside(cpu_sweep, tmp_path):
    _, src, _ = cpu_sweep
    d = tmp_path / src.name
    shutil.copytree(src, d)
    bad = d / "points" / "ctx256-kv1-seed0-bfloat16"
    with open(bad / "report.md", "a") as f:
        f.write("tampered\n")
    assert not point_complete(bad)[0]
    before = {n: (d / "points" / n / "manifest.json").read_bytes() for n in read_config(d)["points"]}
    run_sweep(None, None, sweep_dir=d, progress=False, report=False)
    aside = d / "points" / "ctx256-kv1-seed0-bfloat16.incomplete-1"
    assert aside.is_dir() and (aside / "report.md").read_text().endswith("tampered\n")  # kept, not deleted
    assert point_complete(bad) == (True, [])
    assert (bad / "manifest.json").read_bytes() != before[bad.name]  # a new record
    for n, m in before.items():
        if n != bad.name:
            assert (d / "points" / n / "manifest.json").read_bytes() == m, n  # untouched
    log = [json.loads(x) for x in (d / "sweep_log.jsonl").read_text().splitlines()][4:]
    assert sorted(e["action"] for e in log) == ["moved_aside", "ran", "skipped", "skipped", "skipped"]
    rows = sr.collect(d)
    assert sr.guardrail(rows, read_config(d))[0] == "PASS_GUARDRAIL"
    # a killed run (record without verdict/manifest) is moved aside too, with a new number
    shutil.rmtree(bad)
    bad.mkdir()
    (bad / "params.json").write_text("{}")
    (d / "points" / "ctx512-kv0-seed0-bfloat16" / "manifest.json").unlink()
    rows = sr.collect(d)
    v, reasons = sr.guardrail(rows, read_config(d))
    assert v == "INCOMPLETE" and "ctx256-kv1-seed0-bfloat16" in reasons[-1] and "ctx512-kv0-seed0-bfloat16" in reasons[-1]


def test_a_committed_sweep_without_logits_reports_with_the_flag_only(cpu_sweep, tmp_path):
    """Committed sweeps leave logits.npz out of git: strict collection calls the points incomplete (resume
    reruns them), allow_missing_logits re-renders the committed verdict."""
    _, src, _ = cpu_sweep
    d = tmp_path / src.name
    shutil.copytree(src, d)
    for f in d.glob("points/*/logits.npz"):
        f.unlink()
    assert sr.guardrail(sr.collect(d), read_config(d))[0] == "INCOMPLETE"
    assert sr.guardrail(sr.collect(d, allow_missing_logits=True), read_config(d))[0] == "PASS_GUARDRAIL"


def test_resume_refuses_a_different_matrix(cpu_sweep, capsys):
    _, d, _ = cpu_sweep
    with pytest.raises(SweepError) as e:
        run_sweep(CPU_SWEEP, {"gen": 16}, sweep_dir=d, progress=False)
    assert "differs" in str(e.value) and "\n" not in str(e.value)
    assert main(["sweep", "-f", str(CPU_SWEEP), "-p", "ctx=[256]", "--resume", str(d), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("greta: error: refusing to resume") and "\n" not in err
    assert main(["sweep", "--resume", str(d.parent)]) == 2  # not a sweep dir
    assert "not a sweep directory" in capsys.readouterr().err


def test_failing_point_is_a_result(tmp_path, capsys):
    """kv_aligned=1 runs first and OOMs in prefill: the sweep carries on, the report shows the failure."""
    m = tmp_path / "m.yaml"
    m.write_text(CPU_SWEEP.read_text().replace("ctx: [256, 512]", "ctx: [256]").replace("kv_aligned: [0, 1]", "kv_aligned: [1, 0]")
                 + "point_overrides:\n  - when: {kv_aligned: 1}\n    set: {fault: 'oom:prefill'}\n")
    rc = main(["sweep", "-f", str(m), "-o", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    (d,) = list((tmp_path / "out").glob("*/b3_77-sweep/*"))
    v1 = json.loads((d / "points" / "ctx256-kv1-seed0-bfloat16" / "verdict.json").read_text())
    v0 = json.loads((d / "points" / "ctx256-kv0-seed0-bfloat16" / "verdict.json").read_text())
    assert (v1["verdict"], v1["failed_phase"], v0["verdict"]) == ("FAIL_OOM", "prefill", "EXPECTED_DRIFT")
    assert point_complete(d / "points" / "ctx256-kv1-seed0-bfloat16")[0]  # a complete record of the fault
    assert rc == 1 and out.startswith("FAIL_GUARDRAIL") and "FAIL_OOM" in out
    sv = json.loads((d / "sweep_verdict.json").read_text())
    assert sv["verdict"] == "FAIL_GUARDRAIL" and sv["report_error"] is None
    html = (d / "sweep_report.html").read_text()
    assert "FAIL_OOM" in html and html.count('src="data:image/png;base64,') >= 4


def test_a_point_that_raises_does_not_stop_the_sweep(tmp_path, monkeypatch):
    import greta.probe.runner

    calls = []

    def boom(params, run_dir=None, **kw):
        calls.append(params.ctx)
        raise RuntimeError("synthetic failure\nsecond line")

    monkeypatch.setattr(greta.probe.runner, "run_probe", boom)
    d = run_sweep(CPU_SWEEP, {}, out_root=tmp_path, progress=False, report=False)
    assert calls == [256, 256, 512, 512]
    log = [json.loads(x) for x in (d / "sweep_log.jsonl").read_text().splitlines()]
    assert [e["action"] for e in log] == ["error"] * 4 and "\n" not in log[0]["error"]
    v, reasons = sr.guardrail(sr.collect(d), read_config(d))
    assert v == "INCOMPLETE" and "missing 4 of 4 points" in reasons[0]


# ------------------------------------------------------------------------ matrix files
def test_load_matrix_axes_and_overrides():
    m = load_matrix(CPU_SWEEP, {"ctx": "[128, 384]", "seed": "3", "gen": "4", "span": "2"})
    assert m.axes == {"ctx": [128, 384], "kv_aligned": [0, 1], "seed": [3], "dtype": ["bfloat16"]}
    assert [p["name"] for p in points(m.axes)] == ["ctx128-kv0-seed3-bfloat16", "ctx128-kv1-seed3-bfloat16",
                                                   "ctx384-kv0-seed3-bfloat16", "ctx384-kv1-seed3-bfloat16"]
    p = m.params["ctx384-kv1-seed3-bfloat16"]
    assert (p.ctx, p.kv_aligned, p.seed, p.gen, p.span) == (384, 1, 3, 4, 2)


@pytest.mark.parametrize("text,override,match", [
    ("ctx: []\n", {}, "empty list"),
    ("ctx: [256]\nbogus: 1\n", {}, "unknown param 'bogus'"),
    ("ctx: [256, -5]\n", {}, "point ctx-5-kv1-seed0-bfloat16: param ctx=-5 must be between 1 and"),
    ("dtype: [bfloat16, float8]\n", {}, "dtype='float8' is not one of"),
    ("ctx: [256]\npoint_overrides:\n  - when: {gen: 3}\n    set: {gen: 4}\n", {}, "not an axis"),
    ("ctx: [256]\npoint_overrides: [1]\n", {}, "must be a list of"),
    ("ctx: [256]\n", {"timeouts.nope": "1"}, "unknown param 'timeouts.nope'"),
    ("- 1\n", {}, "must be a mapping"),
    ("ctx: [256\n", {}, "not valid YAML"),
])
def test_load_matrix_errors_are_one_line(tmp_path, text, override, match):
    f = tmp_path / "m.yaml"
    f.write_text(text if text.startswith("-") else "model: tiny\ndevice: cpu\n" + text)
    with pytest.raises(ParamError) as e:
        load_matrix(f, override)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_matrix_exits_2(tmp_path, capsys):
    assert main(["sweep", "-f", str(tmp_path / "none.yaml"), "-o", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sweep", "-o", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("*/b3_77-sweep"))


def test_gpu_matrix_files_declare_the_seed_matrices():
    import yaml

    b76 = yaml.safe_load((REPO / "params" / "b3_76.yaml").read_text())
    assert (b76["ctx"], b76["gen"], b76["span"], b76["kv_aligned"]) == ([4096, 8192, 16384], 128, 32, [0, 1])
    b67 = yaml.safe_load((REPO / "params" / "b3_67.yaml").read_text())
    assert (b67["kv_aligned"], b67["seed"], b67["ctx"]) == ([0, 1], [0, 1, 2], [32768])
    b77 = yaml.safe_load((REPO / "params" / "b3_77_sweep.yaml").read_text())
    assert (b77["ctx"], b77["gen"], b77["span"], b77["kv_aligned"]) == ([4096, 8192, 16384, 32768, 65536, 131072], 64, 16, [0, 1])
    for f, n in (("b3_76.yaml", 6), ("b3_67.yaml", 6), ("b3_77_sweep.yaml", 12)):  # valid but for the device
        cpu = {"device": "cpu", "backend": "torch", "model": "tiny"}  # (llama3-8b at 131072 outgrows this host's RAM)
        assert len(points(load_matrix(REPO / "params" / f, cpu).axes)) == n


# ------------------------------------------------------------------------ guardrail and report on hand-made rows
def _row(ctx, kv, verdict="PASS_EQUIV", complete=True, seed=0, diff=0.0, exists=True):
    return {"name": f"ctx{ctx}-kv{kv}-seed{seed}-bfloat16", "ctx": ctx, "kv_aligned": kv, "seed": seed,
            "dtype": "bfloat16", "exists": exists, "complete": complete,
            "reasons": [] if complete else ["manifest.json is missing"], "verdict": verdict if exists else None,
            "reason": None, "bit_exact": diff == 0 if verdict in ("PASS_EQUIV", "EXPECTED_DRIFT") else None,
            "max_abs_diff": diff if verdict in ("PASS_EQUIV", "EXPECTED_DRIFT", "FAIL_EQUIV") else None,
            "p99_abs_diff": None, "top1_agreement": 1.0 if verdict in ("PASS_EQUIV", "EXPECTED_DRIFT") else None,
            "per_position_max_abs_diff": [diff, diff * 2, diff * 3] if verdict in ("PASS_EQUIV", "EXPECTED_DRIFT", "FAIL_EQUIV") else [],
            "peak_vram_mb": 20000.0 + ctx / 8 if verdict != "FAIL_TIMEOUT" else None, "floor_mb": 19000.0 + ctx / 8,
            "vram_backend": "nvml", "prefill_s": ctx / 1e4 if verdict not in ("FAIL_OOM", "FAIL_TIMEOUT") else None,
            "prefill_floor_s": ctx / 3e4, "decode_ms_per_token": 8.0 if verdict.startswith(("PASS", "EXP")) else None,
            "decode_floor_ms": 6.0, "gen": 128, "span": 3, "model": "llama3-8b", "device": "H100", "threshold": 5e-3}


MATRIX = {"axes": {"ctx": [4096, 8192], "kv_aligned": [0, 1], "seed": [0], "dtype": ["bfloat16"]}}


def test_guardrail_verdicts():
    full = [_row(4096, 0, "EXPECTED_DRIFT", diff=0.04), _row(4096, 1), _row(8192, 0, "FAIL_OOM"), _row(8192, 1, diff=1e-3)]
    assert sr.guardrail(full, MATRIX)[0] == "PASS_GUARDRAIL"  # an OOM at kv0 is a result
    failed = full[:3] + [_row(8192, 1, "FAIL_EQUIV", diff=0.2)]
    v, reasons = sr.guardrail(failed, MATRIX)
    assert v == "FAIL_GUARDRAIL" and "ctx8192-kv1-seed0-bfloat16: FAIL_EQUIV" in reasons[0]
    oom = full[:3] + [_row(8192, 1, "FAIL_OOM")]
    assert sr.guardrail(oom, MATRIX)[0] == "FAIL_GUARDRAIL"
    missing = full[:2] + [_row(8192, 1, complete=False)]
    v, reasons = sr.guardrail(missing, MATRIX)
    assert v == "INCOMPLETE" and "missing 2 of 4" in reasons[0]
    assert "ctx8192-kv0-seed0-bfloat16 (no record)" in reasons[0] and "ctx8192-kv1-seed0-bfloat16 (manifest.json is missing)" in reasons[0]
    v, reasons = sr.guardrail(failed[:1] + failed[3:], MATRIX)  # a definite failure outranks missing points
    assert v == "FAIL_GUARDRAIL" and any("missing 2 of 4" in r for r in reasons)
    kv0_only = {"axes": {**MATRIX["axes"], "kv_aligned": [0]}}
    assert sr.guardrail([_row(4096, 0, "EXPECTED_DRIFT"), _row(8192, 0, "EXPECTED_DRIFT")], kv0_only)[0] == "FAIL_GUARDRAIL"
    assert sr.guardrail([], MATRIX)[0] == "INCOMPLETE"


def test_results_table_and_plots_on_hand_made_rows(tmp_path):
    rows = [_row(4096, 0, "EXPECTED_DRIFT", diff=0.04), _row(4096, 1), _row(8192, 0, "FAIL_OOM"),
            _row(8192, 1, "FAIL_TIMEOUT"), _row(16384, 1, exists=False, complete=False)]
    t = s77.results_table_md(rows).splitlines()
    assert t[0] == "| Context | KV | Peak memory (MiB) | Max Logits Diff | Top-1 Agreement | Verdict | Seed | Dtype |"
    assert t[2] == "| 4096 | 0 | 20512 | 0.040000 | 1.0000 | EXPECTED_DRIFT | 0 | bfloat16 |"
    assert t[4].startswith("| 8192 | 0 | 21024 | — | — | FAIL_OOM |") and "not run" in t[6]
    assert len(t) == 2 + len(rows)
    for fn, name in ((s77.plot_vram_vs_ctx, "v.png"), (s77.plot_time_vs_ctx, "t.png"), (s77.plot_diff_vs_ctx, "d.png"),
                     (s77.plot_drift, "r.png")):
        fig = fn(rows, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 10000
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" or fn is s77.plot_drift
        assert ax.get_xlabel() and ax.get_ylabel()
    # the analytic floor of llama3-8b is a line under the measured peaks
    fig = s77.plot_vram_vs_ctx(rows)
    floor = [ln for ln in fig.axes[0].lines if "floor" in (ln.get_label() or "")]
    assert floor and min(floor[0].get_ydata()) > 15000


@pytest.mark.parametrize("name", ["sweep.ipynb", "sweep_report.ipynb"])
def test_sweep_notebooks_are_clean_and_parameterized(name):
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    ns: dict = {}
    exec(tagged[0].source, ns)
    assert ("sweep_dir" in ns) if name == "sweep_report.ipynb" else {"matrix_file", "overrides", "out_root", "resume"} <= set(ns)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (not on CI)")
def test_sweep_report_opens_standalone_in_chromium(cpu_sweep, tmp_path):
    """The HTML, copied alone into an empty folder, renders in headless Chromium; a blank page does not pass."""
    import subprocess
    import sys

    _, d, _ = cpu_sweep
    html = tmp_path / "alone" / "sweep_report.html"
    html.parent.mkdir()
    shutil.copy(d / "sweep_report.html", html)
    script = REPO / "scripts" / "check_html.py"
    r = subprocess.run([sys.executable, str(script), str(html), "--png", str(tmp_path / "shot.png")],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    assert (tmp_path / "shot.png").stat().st_size > 20000
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body style='background:#fff'></body></html>")
    r = subprocess.run([sys.executable, str(script), str(blank), "--png", str(tmp_path / "b.png")],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and r.stdout.startswith("BLANK"), r.stdout + r.stderr


@pytest.mark.slow
def test_sweep_notebook_runs_a_sweep(tmp_path):
    """notebooks/sweep.ipynb under papermill: the same sweep as the CLI, its verdict shown in the notebook."""
    from greta.reports.notebooks import execute_notebook

    out = tmp_path / "sweep.ipynb"
    err = execute_notebook(REPO / "notebooks" / "sweep.ipynb", out,
                           dict(matrix_file=str(CPU_SWEEP), overrides={"ctx": [256]}, out_root=str(tmp_path / "out")))
    assert err is None, err
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    (verdict,) = (tmp_path / "out").glob("*/*/*/sweep_verdict.json")
    v = json.loads(verdict.read_text())
    assert v["verdict"] == "PASS_GUARDRAIL", v
    assert len(list((verdict.parent / "points").iterdir())) == 2
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "PASS_GUARDRAIL" in text


# ------------------------------------------------------------------------ axis coercion, matrix file reading
def _matrix_file(tmp_path, text):
    f = tmp_path / "m.yaml"
    f.write_text("model: tiny\ndevice: cpu\ngen: 8\nspan: 4\n" + text)
    return f


def test_point_overrides_match_axis_values_given_as_cli_strings(tmp_path):
    """-p seed=3 is the int 3 before point_overrides are matched (when: {seed: 3} applies)."""
    f = _matrix_file(tmp_path, "ctx: [256]\npoint_overrides:\n  - when: {seed: 3, ctx: 256}\n    set: {gen: 16}\n")
    m = load_matrix(f, {"seed": "3"})
    assert m.axes["seed"] == [3] and list(m.params) == ["ctx256-kv1-seed3-bfloat16"]
    assert m.params["ctx256-kv1-seed3-bfloat16"].gen == 16
    m = load_matrix(f, {"seed": "4", "ctx": "[256.0]"})
    assert m.axes["ctx"] == [256] and m.params["ctx256-kv1-seed4-bfloat16"].gen == 8


@pytest.mark.parametrize("text,override", [
    ("ctx: [256, 256.0]\n", {}),
    ("ctx: [256]\n", {"seed": "[3, '3']"}),
])
def test_axis_values_equal_after_coercion_are_duplicates(tmp_path, text, override):
    with pytest.raises(ParamError) as e:
        load_matrix(_matrix_file(tmp_path, text), override)
    assert "duplicate axis values" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,match", [
    ("ctx: [256]\nctx: [512]\n", "duplicate key 'ctx'"),
    ("ctx: [256]\npoint_overrides:\n  - when: {ctx: [256]}\n    set: {gen: 16}\n", "point_overrides: when ctx"),
    ("ctx: [256]\ntimeouts: 5\n", "timeouts=5"),
])
def test_load_matrix_refuses_more_in_one_line(tmp_path, text, match):
    with pytest.raises(ParamError) as e:
        load_matrix(_matrix_file(tmp_path, text), {})
    assert match in str(e.value) and "\n" not in str(e.value)


def test_finish_passes_its_rows_to_the_report_notebook(cpu_sweep):
    """The report notebook gets finish's rows as a parameter: each point is verified once per finish."""
    _, d, _ = cpu_sweep
    nb = nbformat.read(d / "sweep_report.ipynb", as_version=4)
    (injected,) = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    ns: dict = {}
    exec(injected.source, ns)
    assert [r["name"] for r in ns["rows"]] == read_config(d)["points"]
    assert all(r["complete"] and r["verdict"] for r in ns["rows"])
    # the parameter carries the rows whole, each point's dir relative to the sweep (the kernel runs in it)
    assert ns["rows"] == [{**r, "dir": f"points/{r['name']}"} for r in sr.collect(d.resolve())]
    assert ns["sweep_dir"] == "."
    src = nbformat.read(REPO / "notebooks" / "sweep_report.ipynb", as_version=4)
    (params,) = [c for c in src.cells if "parameters" in c.metadata.get("tags", [])]
    ns = {}
    exec(params.source, ns)
    assert ns["rows"] is None and ns["allow_missing_logits"] is False


# ------------------------------------------------------------------------ the price of exactness
def test_price_of_exactness_in_the_real_sweep(cpu_sweep):
    """The CI sweep has both kv modes at 256 and 512: the report shows kv1 / kv0 per phase, from the records."""
    _, d, _ = cpu_sweep
    rows = sr.collect(d)
    price = s77.price_of_exactness(rows)
    assert [p["ctx"] for p in price] == [256, 512]
    by = {(r["ctx"], r["kv_aligned"]): r for r in rows}
    for p in price:
        for key in ("prefill_s", "decode_ms_per_token"):
            a, b = by[(p["ctx"], 1)][key], by[(p["ctx"], 0)][key]
            assert a > 0 and b > 0 and p[f"{key}_ratio"] == pytest.approx(a / b)
    assert "Price of exactness" in (d / "sweep_report.html").read_text()
    assert "prefill kv1/kv0" in s77.price_of_exactness_md(rows)


def test_price_of_exactness_on_hand_made_rows():
    rows = [_row(4096, 1), _row(4096, 0, "EXPECTED_DRIFT", diff=0.01), _row(8192, 1)]
    rows[1]["prefill_s"], rows[1]["decode_ms_per_token"] = 0.2048, 4.0  # kv1: 0.4096 s, 8 ms
    price = s77.price_of_exactness(rows)
    assert price == [{"ctx": 4096, "seed": 0, "dtype": "bfloat16", "kv1_prefill_s": 0.4096, "kv0_prefill_s": 0.2048,
                      "prefill_s_ratio": 2.0, "kv1_decode_ms_per_token": 8.0, "kv0_decode_ms_per_token": 4.0,
                      "decode_ms_per_token_ratio": 2.0}]  # 8192 has no kv0 point: no ratio
    assert "| 4096 | 0.41 | 0.205 | 2.00 | 8 | 4 | 2.00 |" in s77.price_of_exactness_md(rows)
    # a failed kv0 point (no times) gives blank ratios, and a sweep of one mode says there is nothing to show
    rows[1].update(prefill_s=None, decode_ms_per_token=None)
    assert s77.price_of_exactness(rows)[0]["prefill_s_ratio"] is None
    assert "no price of exactness" in s77.price_of_exactness_md([_row(4096, 1), _row(8192, 1)])
