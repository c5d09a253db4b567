"""The engine axis of a sweep (greta.record.matrix, docs/ENGINES.md): engine x kv_aligned, the combinations a peer
engine cannot run (engine=hf with kv_aligned=1) skipped by the matrix rule and named in the report; a real small
sweep on a transformers checkpoint compares Greta and transformers side by side in one report."""
from __future__ import annotations

import json

import pytest

from greta.record.matrix import load_matrix
from greta.record.params import ParamError
from greta.reports import sweep_b3_77 as s77
from greta.sweeps import report as sr


def _matrix(tmp_path, text: str):
    f = tmp_path / "m.yaml"
    f.write_text(text)
    return load_matrix(f)


def test_engine_axis_skips_what_a_peer_cannot_run(tmp_path):
    m = _matrix(tmp_path, "model: tiny\nctx: [64]\ngen: 4\nspan: 2\nkv_aligned: [1, 0]\nengine: [greta, hf]\n")
    assert list(m.params) == ["ctx64-kv1-greta-seed0-bfloat16", "ctx64-kv0-greta-seed0-bfloat16",
                              "ctx64-kv0-hf-seed0-bfloat16"]
    (name, why), = m.skipped()
    assert name == "ctx64-kv1-hf-seed0-bfloat16" and "engine=hf" in why and "kv_aligned=1" in why
    assert [p.engine for p in m.points()] == ["greta", "greta", "hf"]
    # the matrix's own (non-axis) params are not skipped: a peer with one of Greta's modes stops in one line
    with pytest.raises(ParamError, match="use -p backend=torch"):
        _matrix(tmp_path, "model: tiny\nbackend: triton\nkv_aligned: [0]\nengine: [greta, hf]\n")
    with pytest.raises(ParamError) as e:
        _matrix(tmp_path, "model: tiny\nkv_aligned: [1]\nengine: [hf]\n")
    assert "every combination of its axes is skipped" in str(e.value) and "\n" not in str(e.value)


def test_a_matrix_without_an_engine_axis_keeps_its_point_names(tmp_path):
    m = _matrix(tmp_path, "model: tiny\nctx: [64]\ngen: 4\nspan: 2\nkv_aligned: [1, 0]\n")
    assert list(m.params) == ["ctx64-kv1-seed0-bfloat16", "ctx64-kv0-seed0-bfloat16"] and m.skipped() == []


def _row(engine, kv, verdict, **kw):
    base = {"name": f"ctx64-kv{kv}-{engine}-seed0-float32", "ctx": 64, "kv_aligned": kv, "seed": 0, "dtype": "float32",
            "engine": engine, "engine_version": None, "exists": True, "complete": True, "reasons": [], "verdict": verdict,
            "bit_exact": verdict == "PASS_EQUIV", "max_abs_diff": 0.0, "p99_abs_diff": 0.0, "top1_agreement": 1.0,
            "first_diff_step": None, "first_diff_position": None, "prefill_tokens_per_s": 100.0,
            "decode_ms_per_token": 20.0, "ok": True}
    return {**base, **kw}


def test_engines_table_side_by_side():
    rows = [_row("greta", 1, "PASS_EQUIV"),
            _row("greta", 0, "EXPECTED_DRIFT", bit_exact=False, max_abs_diff=6e-5, first_diff_step=0, first_diff_position=63),
            _row("hf", 0, "ENGINE_DRIFT", bit_exact=False, max_abs_diff=4e-5, first_diff_step=1, first_diff_position=64,
                 engine_version="transformers 5.0|x")]
    t = s77.engines_table_md(rows).splitlines()
    assert t[0].startswith("| Engine | Context | bit_exact | Max \\|Δlogit\\| | p99 \\|Δlogit\\| | Top-1 |")
    assert t[2].startswith("| greta/kv1 | 64 | True | 0 |") and "| none |" in t[2] and t[2].endswith("| PASS_EQUIV |")
    assert "step 0 (position 63)" in t[3] and "| 50.0 |" in t[3]  # 20 ms/token is 50 tokens/s
    assert t[4].startswith("| hf (transformers 5.0\\|x) |") and "step 1 (position 64)" in t[4] and "ENGINE_DRIFT" in t[4]
    assert s77.has_peers(rows) and not s77.has_peers(rows[:2])
    assert s77.price_of_exactness(rows)[0]["ctx"] == 64 and len(s77.price_of_exactness(rows)) == 1  # greta's pair only


def test_guardrail_does_not_count_a_peers_drift_as_greta_failing():
    matrix = {"axes": {"ctx": [64], "kv_aligned": [1, 0], "engine": ["greta", "hf"], "seed": [0], "dtype": ["float32"]}}
    rows = [_row("greta", 1, "PASS_EQUIV"), _row("greta", 0, "EXPECTED_DRIFT"), _row("hf", 0, "ENGINE_DRIFT")]
    v, reasons = sr.guardrail(rows, matrix)
    assert v == "PASS_GUARDRAIL" and "all 3 points complete" in reasons[0]
    assert sr.guardrail(rows[:1] + [_row("greta", 0, "EXPECTED_DRIFT")] + [_row("hf", 0, "ENGINE_DRIFT", complete=False)],
                        matrix)[0] == "INCOMPLETE"


def test_the_report_names_the_skipped_combinations_and_why():
    cfg = {"sweep_id": "x", "axes": {"ctx": [64], "kv_aligned": [1, 0], "engine": ["greta", "hf"], "seed": [0],
                                     "dtype": ["float32"]}, "base": {"model": "smollm2"}}
    rows = [_row("greta", 1, "PASS_EQUIV"), _row("greta", 0, "EXPECTED_DRIFT"), _row("hf", 0, "ENGINE_DRIFT")]
    text = sr.matrix_md(cfg, rows)
    assert "→ 3 points" in text and "not run and not failed: 1 of the axes' combinations" in text
    assert "- `ctx64-kv1-hf-seed0-float32` — engine=hf runs its own prefill and decode, which have no kv_aligned=1" in text
    assert "Skipped" not in sr.matrix_md({**cfg, "axes": {**cfg["axes"], "engine": ["greta"]}}, rows[:2])


@pytest.mark.slow
def test_a_small_engine_sweep_compares_greta_and_transformers(hf_checkpoint, tmp_path):
    pytest.importorskip("accelerate")
    from greta.sweeps.sweep import run_sweep
    from greta.sweeps.verify import verify_sweep

    f = tmp_path / "engines.yaml"
    f.write_text(f"model: {hf_checkpoint('peer')}\ndevice: cpu\ndtype: float32\nctx: [32]\ngen: 4\nspan: 2\n"
                 "kv_aligned: [1, 0]\nengine: [greta, hf]\nprefill_chunk: 16\nkv_block: 16\nsampling_period_s: 0.2\n")
    d = run_sweep(f, out_root=tmp_path / "out", progress=False)
    sv = json.loads((d / "sweep_verdict.json").read_text())
    assert sv["verdict"] == "PASS_GUARDRAIL" and sv["report_error"] is None, sv
    assert sv["points"]["ctx32-kv1-greta-seed0-float32"]["verdict"] == "PASS_EQUIV"
    assert sv["points"]["ctx32-kv0-hf-seed0-float32"]["verdict"] in ("PASS_EQUIV", "ENGINE_DRIFT")
    assert "ctx32-kv1-hf-seed0-float32" not in sv["points"]
    page = (d / "sweep_report.html").read_text()
    assert "Engines side by side" in page and "Skipped by the matrix rule" in page and "ctx32-kv1-hf-seed0-float32" in page
    assert verify_sweep(d) == []
    _an_old_verdict_on_a_peer_record_does_not_verify(d / "points" / "ctx32-kv0-hf-seed0-float32", tmp_path)


def _an_old_verdict_on_a_peer_record_does_not_verify(point, tmp_path):
    """A peer's record stating EXPECTED_DRIFT (the verdict before peers had their own), resealed: verify recomputes
    the peer's verdict from its metrics and names the difference."""
    import shutil

    from greta.checks.verify import verify
    from greta.record.store import seal

    copy = tmp_path / "forged"
    shutil.copytree(point, copy)
    v = json.loads((copy / "verdict.json").read_text())
    v["verdict"] = "EXPECTED_DRIFT" if v["verdict"] == "ENGINE_DRIFT" else "ENGINE_DRIFT"
    (copy / "verdict.json").write_text(json.dumps(v))
    seal(copy)
    assert any("but the stored metrics give" in r for r in verify(copy)), verify(copy)
