"""The tp-invariance probe (probe=tp_invariance) end to end on the CPU, gloo, the tiny-tp preset: one run
starts tp ranks and runs degrees 1, 2, .. tp on ranks 0..d-1. With the segment tree every prefill, decode and
reference logit is bit-identical to tp=1's (PASS_TP_INVARIANT, a record that verifies); its negative control,
today's per-rank K order (perturb=tp_plain_order), differs (FAIL_TP_INVARIANT); rope_offset fails the
within-degree half; kv_aligned=0 measures (TP_DRIFT); a killed rank is FAIL_ERROR. verify catches a rewritten
figure and a bit_exact its fingerprints deny; analyze recomputes the metrics from tp_logits.npz; bad params are
refused in one line. Each configuration runs once per module (tp worker processes, one thread each)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from greta.checks.analyze import analyze_run
from greta.checks.verify import verify
from greta.probe.kinds import KINDS
from greta.probe.preflight import preflight
from greta.probe.runner import run_probe
from greta.record.params import ParamError, load_params
from greta.record.store import seal
from greta.record.tp_invariance import (LOGITS_FILE, degrees_of, logits_arrays, logits_from_arrays, path_diff,
                                        tp_metrics, tp_verdict)
from greta.reports.tp_heatmap import draw_heatmap, heatmap_data

PARAMS = "params/tp_invariance.yaml"
SMALL = {"ctx": 21, "gen": 4, "span": 4, "prefill_chunk": 16, "kv_block": 32, "sampling_period_s": 0.2}
CONFIGS = {
    "pass": {},
    "control": {"perturb": "tp_plain_order"},
    "rope": {"tp": 2, "perturb": "rope_offset"},
    "drift": {"tp": 2, "kv_aligned": 0},
    "killed": {"tp": 2, "fault": "kill:reference@1"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-invariance-records")
    done: dict = {}

    def get(name: str) -> Path:
        if name not in done:
            params = preflight(load_params(PARAMS, {**SMALL, **CONFIGS[name]}))
            done[name] = Path(run_probe(params, out_root=root, progress=False))
        return done[name]

    return get


def rj(d: Path, name: str):
    return json.loads((d / name).read_text())


@pytest.mark.parametrize("name,verdict", [("pass", "PASS_TP_INVARIANT"), ("control", "FAIL_TP_INVARIANT"),
                                          ("rope", "FAIL_TP_INVARIANT"), ("drift", "TP_DRIFT")])
def test_verdicts_and_records_verify(runs, name, verdict):
    d = runs(name)
    v, m = rj(d, "verdict.json"), rj(d, "metrics.json")
    assert v["verdict"] == verdict, v["reason"]
    assert verify(d) == []
    assert m["degrees"] == degrees_of(rj(d, "params.json")["tp"])
    assert (m["max_abs_diff"] == 0) == (verdict == "PASS_TP_INVARIANT") == m["bit_exact"]
    assert f"Verdict: **{verdict}**" in (d / "report.md").read_text()


def test_the_tree_gives_tp1s_bits_at_tp2_and_tp4(runs):
    d = runs("pass")
    m, meta = rj(d, "metrics.json"), rj(d, "metadata.json")
    assert m["degrees"] == [1, 2, 4] and meta["tree_segments"] == 8 and meta["tp"]["exact"] == "tree"
    for r in m["across"]:
        for path in ("prefill", "decode", "reference"):
            assert r[path]["bit_exact"] and r[path]["first_diff_pos"] is None and r[path]["max_abs_diff"] == 0.0
        assert len(r["prefill"]["per_position"]) == 21 and len(r["decode"]["per_position"]) == 3
    assert all(w["bit_exact"] for w in m["within"]) and all(p[2] == 0.0 for p in m["pairs"])
    with np.load(d / LOGITS_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    assert not any(arrays[k].any() for k in arrays if "_xor_" in k)  # every degree's bits are tp=1's
    assert arrays["prefill"].shape == (21, 2048) and arrays["decode"].shape == (3, 2048)


def test_the_plain_per_rank_order_differs_and_says_where(runs):
    """The negative control: without the tree tp=2 and tp=4 give other bits in every path; decode still
    equals its prefill within each degree (rank order is exact within one)."""
    m = rj(runs("control"), "metrics.json")
    assert "tree_segments" not in rj(runs("control"), "metadata.json")
    for r in m["across"]:
        for path in ("prefill", "decode", "reference"):
            assert r[path]["max_abs_diff"] > 0 and r[path]["first_diff_pos"] is not None, (r["tp"], path)
        assert r["decode"]["first_diff_pos"] >= 21
    assert all(w["bit_exact"] for w in m["within"])
    f = m["first_difference"]
    assert (f["tp"], f["path"]) == (2, "prefill")
    assert f"differs first at position {f['position']}" in rj(runs("control"), "verdict.json")["reason"]


def test_rope_offset_fails_within_each_degree_not_across(runs):
    m = rj(runs("rope"), "metrics.json")
    assert all(r["bit_exact"] for r in m["across"])  # the same wrong positions at every degree
    assert not any(w["bit_exact"] for w in m["within"])
    assert m["first_difference"]["path"] == "decode vs reference"


def test_a_killed_rank_is_a_verifying_fault_record(runs):
    d = runs("killed")
    v = rj(d, "verdict.json")
    assert (v["verdict"], v["failed_phase"]) == ("FAIL_ERROR", "reference") and "rank 1" in v["reason"]
    assert verify(d) == []


def test_verify_catches_a_rewritten_figure_and_a_denied_bit_exact(runs, tmp_path):
    d = tmp_path / "tampered"
    shutil.copytree(runs("control"), d)
    m = rj(d, "metrics.json")
    m["across"][0]["prefill"]["max_abs_diff"] = 0.0
    (d / "metrics.json").write_text(json.dumps(m))
    seal(d)
    assert any("across is not what tp_logits.npz gives" in e for e in verify(d))
    (d / LOGITS_FILE).unlink()  # without the logits the fingerprints still hold bit_exact
    m["bit_exact"] = True
    (d / "metrics.json").write_text(json.dumps(m))
    v = rj(d, "verdict.json")
    v["bit_exact"] = True
    (d / "verdict.json").write_text(json.dumps(v))
    seal(d)
    errors = verify(d, allow_missing_large=True)
    assert any("fingerprints say the degrees are not bit-identical" in e for e in errors), errors


@pytest.mark.parametrize("name,verdict", [("pass", "PASS_TP_INVARIANT"), ("control", "FAIL_TP_INVARIANT")])
def test_analyze_recomputes_a_tp_record(runs, name, verdict):
    rep = analyze_run(runs(name))
    assert rep["status"] == "OK", rep["reasons"]
    assert rep["verdict"] == rep["stored_verdict"] == verdict


def test_the_heat_map_reads_the_record(runs):
    ok, bad = heatmap_data(runs("pass")), heatmap_data(runs("control"))
    assert ok.degrees == bad.degrees == [2, 4] and ok.positions == list(range(24))
    assert ok.grid.shape == (2, 24) and not ok.grid.any() and "48 of 48 cells bit-identical" in ok.alt_text()
    assert bad.grid[:, 0].all() and bad.grid.max() == rj(runs("control"), "metrics.json")["max_abs_diff"]
    draw_heatmap(bad)
    assert heatmap_data(runs("killed")).grid.size == 0 and "no comparison" in heatmap_data(runs("killed")).alt_text()


def test_the_sweep_section_tabulates_points():
    (section,) = KINDS["tp_invariance"].sweep_sections(
        [{"name": "p0", "tp": 4, "ctx": 21, "kv_aligned": 1, "perturb": "none", "max_abs_diff": 0.0,
          "bit_exact": True, "verdict": "PASS_TP_INVARIANT"}], lambda name: None)
    assert "PASS_TP_INVARIANT" in section.table and "| p0 | 21 | 1 |" in section.table


# --- in this process: the comparison's figures and the logits file ---------------------------------------------
def _logits(diff_at: tuple[int, str, int] | None = None) -> dict:
    g = np.random.default_rng(0)
    base = {p: g.standard_normal((n, 16)).astype(np.float32) for p, n in (("prefill", 5), ("decode", 2), ("reference", 2))}
    base["reference"] = base["decode"].copy()
    out = {"degrees": [1, 2, 4], **{p: {d: base[p].copy() for d in (1, 2, 4)} for p in base}}
    if diff_at:
        d, p, row = diff_at
        out[p][d][row, 3] = np.nextafter(out[p][d][row, 3], np.float32(np.inf))
    return out


def test_metrics_name_the_first_difference_and_round_trip_the_file():
    assert degrees_of(2) == [1, 2] and degrees_of(8) == [1, 2, 4, 8] and degrees_of(3) == [1, 3] and degrees_of(1) == [1]
    same = tp_metrics(_logits(), ctx=5)
    assert same["bit_exact"] and tp_verdict(same, 1)[0] == "PASS_TP_INVARIANT" and tp_verdict(same, 0)[0] == "TP_DRIFT"
    one_ulp = _logits((4, "decode", 1))
    m = tp_metrics(one_ulp, ctx=5)
    assert not m["bit_exact"] and m["first_difference"] == {"tp": 4, "path": "decode", "position": 6}
    assert tp_verdict(m, 1)[0] == "FAIL_TP_INVARIANT" and m["max_abs_diff"] > 0
    back = logits_from_arrays(logits_arrays(one_ulp))
    assert all(np.array_equal(back[p][d].view(np.uint32), one_ulp[p][d].view(np.uint32))
               for p in ("prefill", "decode", "reference") for d in (1, 2, 4))
    assert tp_metrics(back, ctx=5) == m


def test_a_nan_and_a_negative_zero_count_as_differences():
    ref = np.zeros((2, 4), dtype=np.float32)
    got = ref.copy()
    got[0, 0], got[1, 1] = -0.0, np.nan
    d = path_diff(ref, got, 10)
    assert (d["bit_exact"], d["first_diff_pos"]) == (False, 10) and np.isfinite(d["max_abs_diff"])


# --- refusals, one line each --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,words", [
    ({"tp": 1}, "the tp_invariance probe compares tensor-parallel degrees 1, 2, .. tp; use -p tp=2"),
    ({"tp_invariant": 1}, "is for the b3_77 probe"),
    ({"probe": "b3_77", "perturb": "tp_plain_order"}, "is the tp_invariance probe's control; add -p probe=tp_invariance"),
    ({"model": "tiny", "tp": 2}, "does not divide model tiny's"),
])
def test_bad_params_are_refused_in_one_line(overrides, words):
    with pytest.raises(ParamError) as e:
        load_params(PARAMS, overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_preflight_refuses_what_rank_0_cannot_hold():
    with pytest.raises(ParamError) as e:
        preflight(load_params(PARAMS, {"ctx": 2**30}))
    msg = str(e.value)
    assert "rank 0 holds every degree's shard and KV cache" in msg or "weights + KV cache need" in msg
    assert "\n" not in msg


# --- slow: the audit pipeline's pages and a sweep of the kind --------------------------------------------------
@pytest.mark.slow
def test_the_cli_audit_of_the_control_has_its_heat_map_page(repo_root, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "greta", "audit", "-f", PARAMS, "-p", "perturb=tp_plain_order",
                        *sum((["-p", f"{k}={v}"] for k, v in SMALL.items()), []), "-o", str(tmp_path), "--quiet"],
                       capture_output=True, text=True, cwd=repo_root, timeout=900)
    assert r.returncode == 1 and r.stdout.startswith("FAIL_TP_INVARIANT: tp=2 prefill differs first"), r.stdout + r.stderr
    (d,) = tmp_path.glob("*/tp_invariance/*")
    assert verify(d) == [] and (d / "tp_heatmap.png").is_file()
    page = (d / "tp_invariance_probe.html").read_text()
    assert "FAIL_TP_INVARIANT" in page and "degree × position" in page and "data:image/png;base64" in page
    assert "cells bit-identical" in (d / "tp_heatmap.html").read_text()


@pytest.mark.slow
def test_a_cpu_tp_invariance_sweep(repo_root, tmp_path):
    from greta.sweeps.sweep import run_sweep
    from greta.sweeps.verify import verify_sweep

    d = run_sweep(repo_root / "params" / "cpu_tp_invariance_sweep.yaml", out_root=tmp_path, progress=False)
    v = json.loads((d / "sweep_verdict.json").read_text())
    assert v["verdict"] == "PASS_GUARDRAIL" and v["report_error"] is None, v
    assert "TP invariance sweep report" in (d / "sweep_report.html").read_text()
    assert verify_sweep(d) == []
