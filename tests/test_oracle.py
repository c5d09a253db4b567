"""The independent oracle: Greta's prefill and decode paths against transformers' LlamaForCausalLM on small
random checkpoints saved by transformers itself (GQA 1/4/8, tied and untied, llama3 scaling beyond
original_max_position_embeddings, linear and dynamic scaling, sharded), in fp32 and bf16; negative controls
show the comparison fails when Greta computes RoPE wrongly."""
from __future__ import annotations

import dataclasses
import sys

import pytest

pytest.importorskip("transformers")

from greta.engine.source import load_config  # noqa: E402
from greta.checks.oracle import TOLERANCES, OracleMissing, compare, format_result  # noqa: E402

LLAMA3 = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
CONFIGS = {
    "gqa1": dict(num_key_value_heads=8),
    "gqa4": dict(num_key_value_heads=2),
    "gqa8": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "llama3": LLAMA3,  # ctx 160 > original_max_position_embeddings 64
    "llama32": dict(LLAMA3, tie_word_embeddings=True, num_key_value_heads=2),  # Llama-3.2: tied + llama3
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64),  # ctx 160 > 64
}
CTX = 160


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    return lambda name: hf_checkpoint(name, **CONFIGS[name])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greta_matches_transformers(ckpt, name, dtype):
    res = compare(str(ckpt(name)), ctx=CTX, dtype=dtype, steps=8)
    print(format_result(res))
    tol = TOLERANCES[dtype]
    for path in ("prefill", "decode"):
        r = res[path]
        assert r["rel"] <= r["limit_rel"] and r["top1_agreement_decisive"] >= tol["top1"], (path, r)
    assert res["prefill"]["decisive_positions"] >= CTX // 4  # the top-1 check is not vacuous
    if dtype == "float32":
        assert res["prefill"]["top1_agreement"] == res["decode"]["top1_agreement"] == 1.0
        assert res["prefill"]["limit_rel"] == tol["rel"]
    else:  # the limit is transformers' own bf16 error (a real, nonzero one) times the stated factor
        own = res["transformers_bf16"]
        for path in ("prefill", "decode"):
            assert 1e-3 < own[path]["rel"] and res[path]["limit_rel"] == tol["rel_factor"] * own[path]["rel"]
            assert res[path]["vs_transformers_bf16"]["rel"] < 4e-2
    assert res["ok"]
    assert res["prefill"]["positions"] == CTX and res["decode"]["positions"] == 8


def test_sharded_checkpoint_matches_transformers(hf_checkpoint):
    d = hf_checkpoint("gqa4-sharded", shard="40KB", num_key_value_heads=2)
    assert (d / "model.safetensors.index.json").is_file()
    assert compare(str(d), ctx=96, dtype="float32")["ok"]


def test_kv_aligned_0_paths_match_too(ckpt):
    assert compare(str(ckpt("gqa4")), ctx=CTX, dtype="float32", kv_aligned=0)["ok"]


# --- negative controls: the oracle can fail ----------------------------------------------------------------
def _wrong(name, ckpt, dtype, **change):
    d = str(ckpt(name))
    good = compare(d, ctx=CTX, dtype=dtype)
    bad = compare(d, ctx=CTX, dtype=dtype, cfg=dataclasses.replace(load_config(d), **change),
                  oracle=good["oracle_logits"])
    return good, bad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dropping_llama3_scaling_fails_the_oracle(ckpt, dtype):
    """The issue's example: a wrong RoPE scaling passes decode == prefill, but not the oracle."""
    good, bad = _wrong("llama3", ckpt, dtype, rope_scaling=None)
    assert good["ok"] and not bad["ok"]
    assert bad["prefill"]["rel"] > 10 * bad["prefill"]["limit_rel"] or bad["prefill"]["top1_agreement"] < 0.9


def test_perturbed_rope_theta_fails_the_oracle_in_fp32(ckpt):
    good, bad = _wrong("gqa4", ckpt, "float32", rope_theta=10000.0 * 1.01)
    assert good["ok"] and not bad["ok"]
    assert bad["decode"]["rel"] > 10 * bad["decode"]["limit_rel"]


def test_swapping_dynamic_for_linear_fails_the_oracle(ckpt):
    good, bad = _wrong("dynamic", ckpt, "float32", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert good["ok"] and not bad["ok"]


# --- CLI and missing dependency ----------------------------------------------------------------------------
def test_cli_oracle_prints_and_exits_by_tolerance(ckpt, capsys, monkeypatch):
    from greta.__main__ import main

    d = str(ckpt("gqa8"))
    assert main(["oracle", "--model", d, "--ctx", "96", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "decode" in out and "max_abs_diff" in out and "top1_agreement" in out
    monkeypatch.setitem(TOLERANCES, "float32", {"rel": 1e-12, "top1": 1.0})  # fp32 summation order differs
    assert main(["oracle", "--model", d, "--ctx", "96", "--dtype", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_missing_transformers_is_one_line(ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(OracleMissing) as e:
        compare(str(ckpt("gqa4")), ctx=32)
    assert "pip install greta[test]" in str(e.value) and "\n" not in str(e.value)


# --- a subset of positions, the built-in control, and the record (greta oracle -o) --------------------------
def test_position_subset_matches_the_full_comparison(ckpt):
    from greta.checks.oracle import compared_positions

    d = str(ckpt("llama3"))
    full = compare(d, ctx=CTX, dtype="float32")
    part = compare(d, ctx=CTX, dtype="float32", positions=20)
    pos = compared_positions(CTX, 8, 20)
    assert pos[0] == 0 and pos[-8:] == list(range(CTX - 8, CTX)) and len(pos) < 30
    assert part["compared_positions"] == pos and part["prefill"]["positions"] == len(pos)
    want = [full["prefill"]["max_abs_diff_per_position"][p] for p in pos]
    assert part["prefill"]["max_abs_diff_per_position"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert part["decode"]["max_abs_diff"] == pytest.approx(full["decode"]["max_abs_diff"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name,change", [("llama3", "rope_scaling dropped"), ("gqa4", "rope_theta x 1.01")])
def test_builtin_control_fails(ckpt, name, change):
    from greta.checks.oracle import verdict

    res = compare(str(ckpt(name)), ctx=CTX, dtype="float32", control=True)
    assert res["control"]["change"] == change and not res["control"]["ok"]
    assert verdict(res) == "PASS_ORACLE"
    assert "the control fails" in format_result(res)


def test_cli_oracle_on_a_preset_writes_a_sealed_record(tmp_path, capsys, monkeypatch):
    """`--model tiny`: transformers saves a random tiny-shape checkpoint (llama3 scaling, original 1024) and the
    comparison runs past its original length; the record holds oracle.json, the plot and report, sealed."""
    import json

    from greta.__main__ import main
    from greta.record.store import MANIFEST

    ck = tmp_path / "ck"
    argv = ["oracle", "--model", "tiny", "--ctx", "1100", "--positions", "40", "--control", "--quiet",
            "--checkpoint-dir", str(ck), "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rec = next((tmp_path / "out").glob("*/oracle/*"))
    assert f"record: {rec}" in out
    body = json.loads((rec / "oracle.json").read_text())
    assert body["verdict"] == "PASS_ORACLE" and body["ctx"] == 1100 and body["model"] == "tiny"
    assert not body["control"]["ok"] and "transformers" in body["checkpoint"]["source"]
    assert body["versions"]["transformers"] and "oracle_logits" not in body
    assert {"oracle.json", "oracle.png", "report.md", "params.json", MANIFEST} <= {p.name for p in rec.iterdir()}
    assert set(json.loads((rec / MANIFEST).read_text())["files"]) == {"oracle.json", "oracle.png", "report.md", "params.json"}
    assert "PASS_ORACLE" in (rec / "report.md").read_text()
    assert (ck / "config.json").is_file()  # kept: --checkpoint-dir was given
    # greta verify: the record verifies; a Greta rel pushed past its limit (even resealed) does not
    from greta.record.store import seal
    from greta.checks.verify import verify

    assert verify(rec) == [] and main(["verify", str(rec)]) == 0
    body["prefill"]["rel"] = 2 * body["prefill"]["limit_rel"]
    (rec / "oracle.json").write_text(json.dumps(body))
    assert any("changed after the record was sealed" in r for r in verify(rec))
    seal(rec, json.loads((rec / "params.json").read_text()))
    assert verify(rec) == ["oracle.json says PASS_ORACLE, but its stored numbers give FAIL_ORACLE"]
    # the control passing too means the comparison is blind: exit 1, FAIL_CONTROL
    monkeypatch.setitem(TOLERANCES, "float32", {"rel": 10.0, "top1": 0.0})
    assert main(["oracle", "--model", str(ck), "--ctx", "64", "--control", "--quiet"]) == 1
    assert "FAIL: the wrong-RoPE control passed too" in capsys.readouterr().out


def test_cli_oracle_bad_out_root_is_one_line(ckpt, tmp_path, capsys):
    from greta.__main__ import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["oracle", "--model", str(ckpt("gqa4")), "--ctx", "32", "-o", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("greta: error:") and "\n" not in err and "-o" in err


def test_a_model_too_big_for_the_device_is_one_line(capsys, tmp_path):
    """llama3-8b in fp32 (32 GB) on this CPU-only machine: refused before any checkpoint is made."""
    import psutil

    from greta.__main__ import main

    if psutil.virtual_memory().total > 40 * 2**30:
        pytest.skip("this host could hold an 8B model in fp32")
    assert main(["oracle", "--model", "llama3-8b", "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("greta: error: the oracle needs about") and "\n" not in err
    assert not (tmp_path / "ck").exists()
