"""Notebooks and plots, on synthetic run directories laid out per docs/RECORD.md.

The end-to-end run of notebooks/run_b3_77.ipynb belongs with the probe's tests.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from matplotlib.figure import Figure

from greta.reports.equivalence_plot import plot_equivalence
from greta.reports.run_tables import table_md, top1_table
from greta.reports.vram_plot import plot_vram
from greta.reports.notebooks import NOTEBOOK_DIR, execute_analysis, figure_path, to_html

NOTEBOOKS = ["run_b3_77.ipynb", "vram_plot.ipynb", "equivalence_analysis.ipynb"]
ANALYSIS = ["vram_plot.ipynb", "equivalence_analysis.ipynb"]
VOCAB = 128256
CTX = 32768
SPAN = 16


# ------------------------------------------------------------ synthetic records


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _per_position(diffs: list[float], disagree_steps=()) -> list[dict]:
    rows = []
    for step, d in enumerate(diffs):
        agree = step not in disagree_steps
        a = 1000 + step
        rows.append({
            "step": step,
            "position": CTX - 1 + step,
            "source": "prefill" if step == 0 else "decode",
            "max_abs_diff": d,
            "mean_abs_diff": d / 40.0,
            "cosine": 1.0 - d * 1e-4,
            "argmax_decode": a if agree else a + 7,
            "argmax_reference": a,
            "agree": agree,
        })
    return rows


def _metrics(per_position: list[dict]) -> dict:
    mx = [r["max_abs_diff"] for r in per_position]
    mismatch = [r["step"] for r in per_position if not r["agree"]]
    return {
        "span": len(per_position), "vocab": VOCAB,
        "max_abs_diff": max(mx), "p99_abs_diff": max(mx) / 5, "mean_abs_diff": sum(mx) / len(mx) / 40,
        "top1_agreement": 1 - len(mismatch) / len(per_position),
        "cosine_min": min(r["cosine"] for r in per_position),
        "cosine_mean": sum(r["cosine"] for r in per_position) / len(per_position),
        "first_argmax_mismatch": mismatch[0] if mismatch else None,
        "bit_exact": max(mx) == 0.0, "tokens_agree": not mismatch,
        "per_position": per_position,
    }


def _write_samples(path: Path, rows: list[tuple]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "phase", "device_used_mb", "allocated_mb", "reserved_mb"])
        for r in rows:
            w.writerow(["" if v is None else v for v in r])


def make_cpu_run(root: Path, n_samples: int = 30) -> Path:
    """A CPU run: RSS backend, empty allocator columns, bit-exact PASS_EQUIV."""
    run = root / "2026-02-09" / "b3_77" / "120000-tiny-ctx256-kv1-ab12"
    run.mkdir(parents=True)
    _write_json(run / "params.json", {
        "model": "tiny", "ctx": 256, "gen": 16, "span": SPAN, "kv_aligned": 1,
        "dtype": "float32", "device": "cpu", "seed": 0, "perturb": None,
        "thresholds": {"max_abs_diff": 5e-3, "p99_abs_diff": 1e-3},
    })
    _write_json(run / "metrics.json", _metrics(_per_position([0.0] * SPAN)))
    _write_json(run / "verdict.json", {
        "verdict": "PASS_EQUIV", "reason": "max|Δ|=0 over 16 steps; top-1 1.0000",
        "failed_phase": None, "bit_exact": True, "kv_aligned": 1,
    })
    phases = [("load", 0.0, 0.6), ("prefill", 0.6, 1.4), ("decode", 1.4, 2.3),
              ("reference", 2.3, 2.9)]
    rows = []
    for i in range(n_samples):
        t = round(i * 0.1, 3)
        ph = next((p for p, s, e in phases if s <= t < e), "reference")
        rows.append((t, ph, 310.0 + 4 * i + (25 if ph == "reference" else 0), None, None))
    _write_samples(run / "vram_samples.csv", rows)
    peak_row = max(rows, key=lambda r: r[2])
    _write_json(run / "vram.json", {
        "backend": "rss", "fallback_reason": "no GPU: process RSS via psutil",
        "device_info": "CPU (x86_64, 16 cores)",
        "sampling_period_sec": 0.1, "samples_count": len(rows),
        "peak_vram_mb": peak_row[2], "peak_timestamp_offset_sec": peak_row[0],
        "allocator_peaks": {},
        "floor": {"weights_mb": 120.0, "kv_cache_mb": 8.0, "total_mb": 128.0},
        "below_floor": False, "below_floor_figures": [],
        "phases": [{"name": p, "start_s": s, "end_s": e} for p, s, e in phases
                   if s < rows[-1][0] + 0.1],
    })
    return run


def make_gpu_run(root: Path) -> Path:
    """A GPU run like the seed's: NVML + allocator, peak below the floor, FAIL_EQUIV."""
    run = root / "2026-02-09" / "b3_77" / "130000-llama3-8b-ctx32768-kv1-cd34"
    run.mkdir(parents=True)
    _write_json(run / "params.json", {
        "model": "llama3-8b", "ctx": CTX, "gen": 64, "span": SPAN, "kv_aligned": 1,
        "dtype": "bfloat16", "device": "cuda", "seed": 0, "perturb": None,
        "thresholds": {"max_abs_diff": 5e-3, "p99_abs_diff": 1e-3},
    })
    diffs = [0.0, 0.0, 0.0039, 0.0078, 0.0, 0.0156, 0.0117, 0.0234, 0.0195, 0.03125,
             0.0273, 0.0312, 0.0469, 0.0391, 0.0625, 0.0547]
    _write_json(run / "metrics.json", _metrics(_per_position(diffs, disagree_steps={9, 13})))
    _write_json(run / "verdict.json", {
        "verdict": "FAIL_EQUIV",
        "reason": "max|Δ|=0.0625 > 5e-3 and argmax differs at step 9",
        "failed_phase": None, "bit_exact": False, "kv_aligned": 1,
    })
    phases = [("load", 0.0, 9.0), ("prefill", 9.0, 45.1), ("decode", 45.1, 80.8),
              ("reference", 80.8, 117.0)]
    rows = []
    for i in range(118):
        t = float(i)
        ph = next((p for p, s, e in phases if s <= t < e), "reference")
        if ph == "load":
            used, alloc, res = 600 + 1700 * i, 1700.0 * i, 1800.0 * i
        else:
            kv = 4104.0 if ph != "load" else 0.0
            bump = 2500.0 if ph in ("prefill", "reference") else 300.0
            alloc = 15316.0 + kv + bump * (0.5 + 0.5 * math.sin(i / 3))
            res = alloc + 900
            used = min(res + 600, 17095.0)  # the sampler saw a capped figure
        rows.append((t, ph, round(used, 1), round(alloc, 1), round(res, 1)))
    _write_samples(run / "vram_samples.csv", rows)
    _write_json(run / "vram.json", {
        "backend": "nvml", "fallback_reason": None, "device_info": "NVIDIA H100 80GB HBM3",
        "sampling_period_sec": 1.0, "samples_count": len(rows),
        "peak_vram_mb": 17095.0, "peak_timestamp_offset_sec": 34.0,
        "allocator_peaks": {
            "load": {"max_allocated_mb": 15316.0, "max_reserved_mb": 15400.0},
            "prefill": {"max_allocated_mb": 22950.0, "max_reserved_mb": 24010.0},
            "decode": {"max_allocated_mb": 19760.0, "max_reserved_mb": 24010.0},
            "reference": {"max_allocated_mb": 23100.0, "max_reserved_mb": 24500.0},
        },
        "floor": {"weights_mb": 15316.0, "kv_cache_mb": 4104.0, "total_mb": 19420.0},
        "below_floor": True, "below_floor_figures": ["sampled peak 17095 MB"],
        "phases": [{"name": p, "start_s": s, "end_s": e} for p, s, e in phases],
    })
    return run


def make_oom_run(root: Path) -> Path:
    """A run that died in prefill: a single VRAM sample, no metrics.json."""
    run = root / "2026-02-09" / "b3_77" / "140000-llama3-8b-ctx32768-kv1-ef56"
    run.mkdir(parents=True)
    _write_json(run / "params.json", {"ctx": CTX, "span": SPAN})
    _write_json(run / "verdict.json", {
        "verdict": "FAIL_OOM", "reason": "torch.OutOfMemoryError in prefill",
        "failed_phase": "prefill", "bit_exact": None, "kv_aligned": 1,
    })
    _write_samples(run / "vram_samples.csv", [(3.0, "prefill", 79800.0, 78000.0, 79100.0)])
    _write_json(run / "vram.json", {
        "backend": "nvml", "fallback_reason": None, "device_info": "NVIDIA H100 80GB HBM3",
        "sampling_period_sec": 1.0, "samples_count": 1,
        "peak_vram_mb": 79800.0, "peak_timestamp_offset_sec": 3.0,
        "allocator_peaks": {"prefill": {"max_allocated_mb": 78000.0, "max_reserved_mb": 79100.0}},
        "floor": {"weights_mb": 15316.0, "kv_cache_mb": 4104.0, "total_mb": 19420.0},
        "below_floor": False, "below_floor_figures": [],
        "phases": [{"name": "prefill", "start_s": 2.5, "end_s": 3.2}],
    })
    return run


# ------------------------------------------------------------------ source form


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_source_notebook_is_clean(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [], f"{name}: committed with outputs"
            assert c.execution_count is None, f"{name}: committed with execution_count"


def test_parameters_cells_declare_run_dir():
    for name in ANALYSIS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        ns: dict = {}
        exec(cell.source, ns)
        assert ns["run_dir"] == "" and ns["into_record"] is False  # opened by hand: only look
    nb = nbformat.read(NOTEBOOK_DIR / "run_b3_77.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    ns = {}
    exec(cell.source, ns)
    for key in ("params_file", "ctx", "gen", "span", "kv_aligned", "dtype", "device", "model",
                "seed", "perturb", "fault", "out_root", "run_dir"):
        assert key in ns, key
    assert ns["run_dir"] is None and ns["out_root"] == "outputs"


def test_figures_go_into_a_record_only_for_the_pipeline(tmp_path):
    """A notebook opened by hand saves its figure to a scratch folder of its process (never into the record),
    and the folder is gone when the process exits."""
    rec, scratch_root = tmp_path / "run", tmp_path / "tmp"
    rec.mkdir()
    scratch_root.mkdir()
    assert figure_path(rec, "vram_plot.png", True) == rec / "vram_plot.png"
    code = ("import sys; from pathlib import Path; from greta.reports.notebooks import figure_path; "
            "p = figure_path(sys.argv[1], 'vram_plot.png', False); p.write_bytes(b'png'); "
            "assert p.parent.is_dir() and Path(sys.argv[1]) not in p.parents; print(p)")
    r = subprocess.run([sys.executable, "-c", code, str(rec)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TMPDIR": str(scratch_root)})
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(scratch_root) and list(rec.iterdir()) == []
    assert list(scratch_root.iterdir()) == []  # removed at exit


# ------------------------------------------------------------------------ plots


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("maker", [make_cpu_run, make_gpu_run, make_oom_run])
def test_plot_vram(tmp_path, maker):
    run = maker(tmp_path)
    fig = plot_vram(run, run / "vram_plot.png")
    assert isinstance(fig, Figure)
    _png_ok(run / "vram_plot.png")
    text = fig._suptitle.get_text()
    vram = json.loads((run / "vram.json").read_text())
    assert vram["device_info"] in text and str(vram["samples_count"]) in text
    assert ("BELOW" in text) == vram["below_floor"]
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any(("RSS" if vram["backend"] == "rss" else "NVML") in lab for lab in labels)
    assert any("floor" in lab and f"{vram['floor']['total_mb']:,.0f}" in lab for lab in labels)
    assert any(lab.startswith("allocator allocated") for lab in labels) == (maker is not make_cpu_run)


def test_plot_vram_single_sample_cpu(tmp_path):
    run = make_cpu_run(tmp_path, n_samples=1)
    plot_vram(run, run / "v.png")
    _png_ok(run / "v.png")


@pytest.mark.parametrize("maker", [make_cpu_run, make_gpu_run, make_oom_run])
def test_plot_equivalence(tmp_path, maker):
    run = maker(tmp_path)
    fig = plot_equivalence(run, run / "equivalence.png")
    _png_ok(run / "equivalence.png")
    verdict = json.loads((run / "verdict.json").read_text())["verdict"]
    assert fig._suptitle.get_text() == verdict
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    if maker is make_gpu_run:
        assert any("argmax disagrees (2 steps)" in lab for lab in labels)
        assert any("5e-3" in lab or "0.005" in lab for lab in labels)
    if maker is make_cpu_run:
        assert any("bit-exact" in lab for lab in labels)


def test_thresholds_come_from_params(tmp_path):
    run = make_gpu_run(tmp_path)
    p = json.loads((run / "params.json").read_text())
    p["thresholds"] = {"max_abs_diff": 0.02, "p99_abs_diff": 0.004}
    (run / "params.json").write_text(json.dumps(p))
    fig = plot_equivalence(run)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("threshold 0.02" in lab for lab in labels)
    assert any("threshold 0.004" in lab for lab in labels)


def test_top1_table(tmp_path):
    rows = top1_table(make_gpu_run(tmp_path))
    assert len(rows) == SPAN
    assert list(rows[0]) == ["step", "position", "source", "argmax_decode", "argmax_reference",
                             "agree", "max_abs_diff"]
    assert rows[0]["source"] == "prefill" and rows[0]["position"] == CTX - 1
    assert [r["step"] for r in rows if not r["agree"]] == [9, 13]
    md = table_md(rows)
    assert md.count("\n") == SPAN + 1
    assert top1_table(make_oom_run(tmp_path / "oom")) == []


# ----------------------------------------------------------------- papermill


def _errors(nb_path: Path) -> list:
    nb = nbformat.read(nb_path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


def _has_inline_png(nb_path: Path) -> bool:
    nb = nbformat.read(nb_path, as_version=4)
    return any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("maker", [make_cpu_run, make_gpu_run])
def test_execute_analysis(tmp_path, maker, monkeypatch):
    run = maker(tmp_path)
    if maker is make_cpu_run:
        # a relative run_dir is the caller's, not the kernel's (whose cwd is the record)
        monkeypatch.chdir(tmp_path)
        paths = [tmp_path / p for p in execute_analysis(run.relative_to(tmp_path))]
    else:
        paths = execute_analysis(run)
    for name in ANALYSIS:
        nb_path = run / name
        html = nb_path.with_suffix(".html")
        assert nb_path in paths and html in paths
        assert not _errors(nb_path), f"{name}: {_errors(nb_path)}"
        assert _has_inline_png(nb_path), name
        assert html.stat().st_size > 10000 and "data:image/png;base64" in html.read_text()
    _png_ok(run / "vram_plot.png")
    _png_ok(run / "equivalence.png")
    # the executed notebooks carry the injected run_dir, as the record names itself (the kernel runs in it)
    nb = nbformat.read(run / "vram_plot.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert nb.metadata.papermill.parameters.run_dir == "."


@pytest.mark.slow
def test_execute_analysis_survives_a_failing_notebook(tmp_path):
    run = make_oom_run(tmp_path)
    (run / "vram.json").unlink()  # a broken record: the VRAM notebook must fail
    paths = execute_analysis(run)
    assert (run / "vram_plot.ipynb") in paths and (run / "vram_plot.html") in paths
    assert _errors(run / "vram_plot.ipynb")
    # the other notebook still ran, and a run without metrics does not break it
    assert not _errors(run / "equivalence_analysis.ipynb")
    assert (run / "equivalence_analysis.html").is_file()
    _png_ok(run / "equivalence.png")


def test_to_html_rerenders(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# hello"), nbformat.v4.new_code_cell("1 + 1")]
    p = tmp_path / "x.ipynb"
    nbformat.write(nb, p)
    out = to_html(p)
    assert out == tmp_path / "x.html" and "hello" in out.read_text()


def test_missing_notebook_dir_is_one_clear_line(tmp_path, monkeypatch):
    import greta.reports.notebooks as gn

    monkeypatch.setattr(gn, "NOTEBOOK_DIR", tmp_path / "nowhere")
    with pytest.raises(gn.NotebooksMissing) as e:
        gn.execute_analysis(make_cpu_run(tmp_path))
    assert "repository checkout" in str(e.value) and "\n" not in str(e.value)
