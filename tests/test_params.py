"""greta.record.params: defaults <- YAML file <- overrides, coercion, and one-line refusals naming the key."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import yaml

from greta.probe.preflight import preflight
from greta.record.params import DEFAULTS, ParamError, Params, load_params, parse_overrides

CPU = "params/cpu_default.yaml"


def checked(path=None, overrides: dict | None = None) -> Params:
    """What a probe runs with: parsed (load_params, pure), then checked against this machine (preflight)."""
    return preflight(load_params(path, overrides))


def refuse(overrides: dict, key: str, path=None) -> str:
    """load_params + preflight must raise a ParamError whose message is one line and names key."""
    with pytest.raises(ParamError) as ei:
        checked(path, overrides)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert key in msg, msg
    return msg


# --- layering -------------------------------------------------------------------------------------
def test_defaults_alone():
    p = load_params()
    assert p.to_dict() == DEFAULTS
    assert p.to_dict() is not DEFAULTS and p.to_dict()["timeouts"] is not DEFAULTS["timeouts"]
    with pytest.raises(dataclasses.FrozenInstanceError):  # params are frozen: change them with replace()
        p.timeouts.decode = 1
    d = p.to_dict()
    d["timeouts"]["decode"] = 1  # the caller's copy, never the module's defaults
    assert DEFAULTS["timeouts"]["decode"] == 600 and p.timeouts.decode == 600


def test_file_layer(repo_root):
    p = load_params(repo_root / CPU)
    want = yaml.safe_load((repo_root / CPU).read_text())
    for k, v in want.items():
        assert p.to_dict()[k] == v, k
    assert set(p.to_dict()) == set(DEFAULTS)


def test_relative_params_file_resolves_from_any_cwd(monkeypatch, tmp_path, repo_root):
    monkeypatch.chdir(tmp_path)
    assert load_params(CPU) == load_params(repo_root / CPU)


def test_overrides_win_over_file_and_defaults():
    p = load_params(CPU, {"ctx": 1024, "timeouts.decode": 7, "kv_aligned": 0})
    assert p.ctx == 1024 and p.kv_aligned == 0
    assert p.timeouts.to_dict() == {**DEFAULTS["timeouts"], "decode": 7}
    assert p.model == "tiny"  # from the file


def test_papermill_style_nested_overrides_merge():
    p = load_params(CPU, {"timeouts": {"decode": 3}, "thresholds": {"top1_agreement": 0.5}})
    assert p.timeouts.to_dict() == {**DEFAULTS["timeouts"], "decode": 3}
    assert p.thresholds.to_dict() == {**DEFAULTS["thresholds"], "top1_agreement": 0.5}


def test_string_coercion_of_cli_values():
    p = load_params(CPU, parse_overrides(["ctx=32768", "timeouts.decode=5", "thresholds.max_abs_diff=0.01",
                                          "kv_aligned=0", "dtype=float32", "sampling_period_s=0.25"]))
    assert p.ctx == 32768 and type(p.ctx) is int
    assert p.timeouts.decode == 5.0 and type(p.timeouts.decode) is float  # seconds may be fractional
    assert p.thresholds.max_abs_diff == 0.01 and type(p.thresholds.max_abs_diff) is float
    assert p.kv_aligned == 0 and p.dtype == "float32" and p.sampling_period_s == 0.25


def test_int_given_for_float_and_integral_float_for_int():
    p = load_params(None, {"sampling_period_s": 2, "ctx": 512.0})
    assert p.sampling_period_s == 2.0 and type(p.sampling_period_s) is float
    assert p.ctx == 512 and type(p.ctx) is int


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("5e-3", 5e-3), ("1.0e-3", 1e-3), ("0.001", 1e-3)])
def test_scientific_notation_string_coerces_to_float(text, value):
    # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string; _coerce must still take it as a float.
    p = load_params(None, {"thresholds.max_abs_diff": text})
    assert p.thresholds.max_abs_diff == pytest.approx(value)


def test_bool_is_not_an_int():
    refuse({"ctx": True}, "ctx")


def test_scientific_notation_in_a_yaml_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("thresholds: {max_abs_diff: 5e-3}\n")
    assert load_params(f).thresholds.max_abs_diff == pytest.approx(5e-3)


def test_parse_overrides():
    assert parse_overrides(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ParamError, match="key=value"):
        parse_overrides(["ctx"])


# --- refusals ---------------------------------------------------------------------------------------
def test_unknown_key():
    refuse({"ctxx": 5}, "ctxx")
    refuse({"timeouts.decod": 5}, "timeouts.decod")


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("ctx: 512\nbogus: 1\n")
    msg = refuse({}, "bogus", path=f)
    assert str(f) in msg


@pytest.mark.parametrize("key,value", [("ctx", "abc"), ("ctx", 1.5), ("sampling_period_s", "fast"),
                                       ("dtype", 16.0), ("dtype", True), ("timeouts.decode", "soon"), ("ctx", None)])
def test_wrong_type(key, value):
    msg = refuse({key: value}, key)
    assert "expected" in msg


def test_span_greater_than_gen():
    refuse({"gen": 8, "span": 9}, "span")
    refuse({"span": 0}, "span")


@pytest.mark.parametrize("value", [0, -1])
def test_ctx_must_be_positive(value):
    refuse({"ctx": value}, "ctx")


@pytest.mark.parametrize("key", ["gen", "prefill_chunk", "kv_block", "sampling_period_s", "timeouts.load"])
def test_other_sizes_must_be_positive(key):
    refuse({key: 0}, key)


def test_bad_choices():
    refuse({"dtype": "float8"}, "dtype")
    refuse({"kv_aligned": 2}, "kv_aligned")
    refuse({"perturb": "rope"}, "perturb")
    refuse({"backend": "vllm"}, "backend")
    refuse({"thresholds.top1_agreement": 1.5}, "thresholds.top1_agreement")
    refuse({"threads": -1}, "threads")


@pytest.mark.parametrize("fault", ["hang", "hang:", "boom:decode", "hang:decod", "oom:decode:1"])
def test_bad_fault_spec(fault):
    refuse({"fault": fault}, "fault")


@pytest.mark.parametrize("fault", ["none", "hang:decode", "oom:prefill", "crash:load", "error:reference",
                                   "error:ceilings"])
def test_good_fault_spec(fault):
    assert load_params(None, {"fault": fault}).fault == fault


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_gpu(device):
    refuse({"device": device}, "device")


def test_bad_device_name():
    refuse({"device": "tpu"}, "device")


def test_missing_params_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ParamError) as ei:
        load_params(missing)
    assert "\n" not in str(ei.value) and str(missing) in str(ei.value)


def test_params_file_not_a_mapping_or_not_yaml(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ParamError, match="mapping"):
        load_params(f)
    g = tmp_path / "bad.yaml"
    g.write_text("ctx: [1, 2\n")
    with pytest.raises(ParamError) as ei:
        load_params(g)
    assert "\n" not in str(ei.value)


def test_nonexistent_prompt_file(tmp_path):
    refuse({"prompt": str(tmp_path / "ids.txt")}, "prompt")


def test_existing_prompt_file_is_accepted(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("1 2 3")
    assert checked(None, {"prompt": str(f), "ctx": 3}).prompt == str(f)


def test_prompt_file_too_short_or_not_ids(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("1, 2, 3")
    msg = refuse({"prompt": str(f), "ctx": 4}, "prompt")
    assert "holds 3 token ids but ctx=4" in msg and "-p ctx=3" in msg
    f.write_text("hello world")
    assert "is not a token-id file" in refuse({"prompt": str(f), "ctx": 2}, "prompt")
    g = tmp_path / "ids.npy"
    np.save(g, np.array([0.5, 1.5]))
    assert "not integers" in refuse({"prompt": str(g), "ctx": 2}, "prompt")
    np.save(g, np.arange(10))
    assert checked(None, {"prompt": str(g), "ctx": 10}).prompt == str(g)


def test_model_neither_preset_nor_checkpoint(tmp_path):
    refuse({"model": "llama9-1t"}, "model")
    refuse({"model": str(tmp_path)}, "model")  # a directory without config.json


def test_checkpoint_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    msg = refuse({"model": str(tmp_path)}, "model")
    assert "safetensors" in msg


def test_checkpoint_dir_with_safetensors_is_accepted(tmp_path, tiny_cfg, tiny_weights):
    from greta.engine.weights import save_checkpoint

    d = save_checkpoint(tiny_weights(), tiny_cfg, tmp_path / "ckpt")
    assert checked(None, {"model": str(d)}).model == str(d)


def test_load_params_does_not_mutate_overrides():
    ov = {"timeouts": {"decode": 3}, "ctx": "64"}
    before = copy.deepcopy(ov)
    load_params(None, ov)
    assert ov == before


# --- found by tests/test_fuzz_params.py --------------------------------------------------------------
@pytest.mark.parametrize("key", ["timeouts.decode", "sampling_period_s", "thresholds.max_abs_diff",
                                 "thresholds.top1_agreement"])
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", float("nan"), float("inf")])
def test_non_finite_floats_are_refused(key, value):
    refuse({key: value}, key)


@pytest.mark.parametrize("key,value", [("ctx", 10**12), ("gen", 10**12), ("ctx", 1e300), ("kv_block", 2**31),
                                       ("seed", -1), ("seed", 2**32), ("threads", 10**6),
                                       ("timeouts.decode", 1e300), ("sampling_period_s", 1e-9)])
def test_out_of_range_values_are_refused(key, value):
    refuse({key: value}, key)


def test_kv_cache_that_cannot_fit_the_machine():
    msg = refuse({"ctx": 2**31 - 1}, "ctx")
    assert "GiB" in msg


def test_a_mapping_for_a_plain_key_is_refused_not_ignored():
    refuse({"probe": {}}, "probe")  # was flattened to nothing and silently ignored
    refuse({"ctx": {"a": 1}}, "ctx")
    refuse({"timeouts": 5}, "timeouts")


def test_huge_values_give_short_messages():
    for v in (10**5000, "9" * 5000, "x" * 10**5):
        msg = refuse({"ctx": v}, "ctx")
        assert len(msg) < 300, len(msg)


def test_unicode_digit_device_is_refused():
    refuse({"device": "cuda:²"}, "device")  # str.isdigit() accepted it, int() then raised


@pytest.mark.parametrize("text", ["ctx: 512\nctx: 1024\n", "timeouts: {decode: 1, decode: 2}\n",
                                  "timeouts.decode: 1\ntimeouts: {decode: 2}\n"])
def test_duplicate_keys_in_a_file(tmp_path, text):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    msg = refuse({}, "twice" if "." in text else "duplicate", path=f)
    assert str(f) in msg


@pytest.mark.parametrize("content", [b"\xff\xfe\x00junk", b"0", b"false", b"''", b"[" * 5000, b"ctx: 1" + b"0" * 5000])
def test_garbage_params_files(tmp_path, content):
    f = tmp_path / "p.yaml"
    f.write_bytes(content)
    refuse({}, str(f), path=f)


def test_overlong_paths_are_refused_in_one_line():
    long = "a" * 5000
    refuse({"prompt": long}, "prompt")
    refuse({"model": long}, "model")
    with pytest.raises(ParamError) as ei:
        load_params(long)  # used to raise OSError (file name too long)
    assert "\n" not in str(ei.value) and "params file" in str(ei.value)


def test_memory_fraction_caps_either_device():
    assert checked(None, {"memory_fraction": 1.0}).memory_fraction == 1.0
    assert checked(None, {"memory_fraction": 0.01}).memory_fraction == 0.01  # the CPU worker's RLIMIT_DATA
    assert "between 0.0001 and 1" in refuse({"memory_fraction": 0}, "memory_fraction")
    assert "between 0.0001 and 1" in refuse({"memory_fraction": 1.5}, "memory_fraction")
