"""The reports' data preparation (vram_series, equivalence_series, thresholds) and their Markdown layer (md, fmt),
without drawing: values, thresholds (a threshold of 0 stays 0), missing figures, escaping."""
from __future__ import annotations

import json

import pytest

from greta.reports import fmt, md
from greta.reports.equivalence_plot import draw_equivalence, equivalence_series
from greta.reports.run_files import DEFAULT_THRESHOLDS, thresholds
from greta.reports.run_tables import metrics_summary_md, vram_summary_md
from greta.reports.vram_plot import Phase, draw_vram, vram_series
from tests.test_notebooks import SPAN, make_cpu_run, make_gpu_run, make_oom_run


def _set_thresholds(run, th):
    p = json.loads((run / "params.json").read_text())
    p["thresholds"] = th
    (run / "params.json").write_text(json.dumps(p))


# ----------------------------------------------------------------------------------------------- thresholds
def test_threshold_of_zero_is_zero_not_the_default(tmp_path):
    run = make_gpu_run(tmp_path)
    _set_thresholds(run, {"max_abs_diff": 0, "p99_abs_diff": 0.0})
    assert thresholds(run) == {"max_abs_diff": 0.0, "p99_abs_diff": 0.0}
    d = equivalence_series(run)
    assert d.thresholds["max_abs_diff"] == 0
    summary = metrics_summary_md(run)
    assert "max_abs_diff ≤ 0," in summary and "p99_abs_diff ≤ 0." in summary
    assert "0.005" not in summary and "5e-3" not in summary
    fig = draw_equivalence(d)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "max_abs threshold 0" in labels and "p99 threshold 0 (over all logits)" in labels
    # drawn on the 0 line of the log axis, which then reads "0 (bit-exact)"
    ax = fig.axes[0]
    zero_line = min(ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--")
    assert 0 < zero_line < min(v for v in d.max_abs if v)


def test_thresholds_missing_negative_or_junk_fall_back_to_the_defaults(tmp_path):
    run = make_gpu_run(tmp_path)
    _set_thresholds(run, {"max_abs_diff": -1, "p99_abs_diff": "x"})
    assert thresholds(run) == DEFAULT_THRESHOLDS
    (run / "params.json").unlink()
    assert thresholds(run) == DEFAULT_THRESHOLDS
    _set_thresholds(make_cpu_run(tmp_path / "c"), {"max_abs_diff": 0.02})
    assert thresholds(tmp_path / "c" / "2026-02-09" / "b3_77" / "120000-tiny-ctx256-kv1-ab12")["max_abs_diff"] == 0.02


# -------------------------------------------------------------------------------------------------- vram data
def test_vram_series_of_a_gpu_run(tmp_path):
    d = vram_series(make_gpu_run(tmp_path))
    assert d.device == "NVIDIA H100 80GB HBM3" and d.backend == "nvml" and d.device_label == "NVML device used"
    assert d.n_samples == 118 and len(d.sample_times) == 118 and d.period_s == 1.0
    assert set(d.series) == {"device_used_mb", "reserved_mb", "allocated_mb"}
    assert max(d.series["device_used_mb"][1]) == 17095.0
    assert (d.floor_mb, d.weights_mb, d.kv_cache_mb) == (19420.0, 15316.0, 4104.0)
    assert d.allocator_peaks == {"load": 15316.0, "prefill": 22950.0, "decode": 19760.0, "reference": 23100.0}
    assert d.peak == (17095.0, 34.0)
    assert d.below_floor and d.below_floor_figures == ["sampled peak 17095 MB"]
    assert d.phases[1] == Phase("prefill", 9.0, 45.1)


def test_vram_series_of_a_cpu_run_has_no_allocator_columns(tmp_path):
    d = vram_series(make_cpu_run(tmp_path))
    assert set(d.series) == {"device_used_mb"} and d.allocator_peaks == {}
    assert d.device_label == "process RSS" and not d.below_floor


def test_vram_series_missing_figures(tmp_path):
    run = make_oom_run(tmp_path)
    v = json.loads((run / "vram.json").read_text())
    for k in ("peak_vram_mb", "phases", "samples_count", "device_info", "floor", "backend"):
        v.pop(k)
    (run / "vram.json").write_text(json.dumps(v))
    d = vram_series(run)
    assert d.peak == (79800.0, 3.0)  # from the samples when vram.json lacks it
    assert d.phases == [Phase("prefill", 3.0, 3.0)]  # from the samples' phase column
    assert d.n_samples == 1 and d.device == "unknown device" and d.device_label == "device used"
    assert d.floor_mb is None
    draw_vram(d)  # draws without the missing figures


def test_vram_series_without_vram_json_raises(tmp_path):
    run = make_cpu_run(tmp_path)
    (run / "vram.json").unlink()
    with pytest.raises(FileNotFoundError):
        vram_series(run)


def test_vram_summary_md_flags_below_floor(tmp_path):
    text = vram_summary_md(make_gpu_run(tmp_path))
    assert "| below_floor | **⚠ TRUE** — sampled peak 17095 MB |" in text
    assert "| floor (weights + KV) | 15,316 MiB + 4,104 MiB = 19,420 MiB |" in text


# ------------------------------------------------------------------------------------------- equivalence data
def test_equivalence_series_of_a_gpu_run(tmp_path):
    d = equivalence_series(make_gpu_run(tmp_path))
    assert d.verdict == "FAIL_EQUIV" and d.kv_aligned == 1
    assert d.steps == list(range(SPAN)) and d.sources[0] == "prefill" and d.sources[1] == "decode"
    assert d.max_abs[:4] == [0.0, 0.0, 0.0039, 0.0078] and d.max_abs[9] == 0.03125
    assert d.disagree_steps == [9, 13] and d.first_mismatch == 9
    assert d.nonfinite_steps == [] and d.summary["max_abs_diff"] == 0.0625


def test_equivalence_series_marks_non_finite_steps(tmp_path):
    run = make_gpu_run(tmp_path)
    m = json.loads((run / "metrics.json").read_text())
    m["per_position"][3]["max_abs_diff"] = float("nan")
    (run / "metrics.json").write_text(json.dumps(m))
    d = equivalence_series(run)
    assert d.max_abs[3] is None and d.nonfinite_steps == [3]


def test_equivalence_series_of_a_failed_run(tmp_path):
    d = equivalence_series(make_oom_run(tmp_path))
    assert d.steps == [] and d.verdict == "FAIL_OOM" and d.failed_phase == "prefill"
    assert d.summary == {"max_abs_diff": None, "p99_abs_diff": None, "mean_abs_diff": None, "top1_agreement": None}
    fig = draw_equivalence(d)
    assert "failed phase: prefill" in " ".join(t.get_text() for t in fig.axes[0].texts)


def test_equivalence_series_without_verdict(tmp_path):
    run = make_cpu_run(tmp_path)
    (run / "verdict.json").unlink()
    assert equivalence_series(run).verdict == "NO VERDICT"


# ------------------------------------------------------------------------------------------------- md and fmt
def test_md_text_escapes_html_and_markdown():
    assert md.text("<b>&'\"") == "&lt;b&gt;&amp;'\""  # quotes stay: no tag can open, so no attribute either
    assert md.text("*a* [l](u) `c` a|b $x$ ~~s~~") == r"\*a\* \[l\](u) \`c\` a\|b \$x\$ \~\~s\~\~"
    assert md.text("max_abs_diff") == "max_abs_diff"  # inside a word an underscore is plain
    assert md.text("_em_") == r"\_em\_"
    assert md.text("# h") == r"\# h" and md.text("1. x") == r"1\. x" and md.text("12) x") == r"12\) x" and md.text("- x") == r"\- x"
    assert md.text("-0.5") == "-0.5"  # not a list marker
    assert md.text("http://x") == r"http\://x"
    assert md.text("a\nb\u202ec") == "a⟨U+000A⟩b⟨U+202E⟩c"
    long = md.text("x" * 5000)
    assert long.startswith("x" * md.MAX_CHARS + md.CUT_MARK) and "3,000 more characters" in long
    assert isinstance(md.text("x"), md.Markup) and md.text(md.bold("x")) == "**x**"  # Markup is not escaped twice


def test_md_code_is_one_span_or_text():
    assert md.code("/models/llama3-8b") == "`/models/llama3-8b`"
    assert md.code("<img>") == "`<img>`"  # a code span shows HTML as text
    for v in ("a`b", "a|b", "$x$", "a\nb", " pad"):
        assert not md.code(v).startswith("`"), v  # cannot be one safe span: escaped text instead


def test_md_table_escapes_every_cell():
    t = md.table(["a|b", "c"], [["x|y", md.bold("z")], [None, 1]]).splitlines()
    assert t == [r"| a\|b | c |", "|---|---|", r"| x\|y | **z** |", "| None | 1 |"]


def test_fmt():
    assert fmt.num(None) == "—" and fmt.num(1.23456, "{:.2f}") == "1.23" and fmt.num(None, "{}", none="") == ""
    assert fmt.diff(0.0) == "0 (bit-exact)" and fmt.diff(0.01234) == "0.0123" and fmt.diff(None) == "n/a"
    assert fmt.threshold(0.0) == "0" and fmt.threshold(5e-3) == "0.005"
    assert fmt.mb(1234.5) == "1,234 MiB" and fmt.mb(None) == "n/a"
    assert fmt.cell(True) == "✓" and fmt.cell(False) == "**✗**" and fmt.cell(0.0, "max_abs_diff") == "0 (bit-exact)"
    assert fmt.cell(0.99999999) == "0.999999990" and fmt.cell(0.5) == "0.5"
    assert fmt.finite("nan") is None and fmt.finite("") is None and fmt.finite(True) is None and fmt.finite("2") == 2.0
