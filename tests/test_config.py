"""greta.engine.config: presets' sizes, HF config round trips, load_config, llama3 RoPE scaling."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from greta.engine.config import PRESETS, ModelConfig
from greta.engine.source import load_config
from greta.engine.config import inv_freq as llama3_inv_freq

# Llama-3-8B's config.json as published (the fields greta reads), for from_hf.
LLAMA3_8B_HF = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


# --- sizes ---------------------------------------------------------------------------------
def test_param_counts_match_the_published_models():
    assert PRESETS["llama3-8b"].param_count() == 8_030_261_248
    assert PRESETS["llama2-7b"].param_count() == 6_738_415_616


def test_prefill_flops_llama3_8b_at_32k():
    assert PRESETS["llama3-8b"].prefill_flops(32768) == pytest.approx(7.39e14, rel=1e-3)


def test_prefill_flops_by_hand_for_tiny():
    c = PRESETS["tiny"]
    ctx = 100
    per_layer = (4 * 32 * 128 + 2 * 32 * 128 + 128 * 4 * 32 + 3 * 384 * 128)  # q, k+v, o, gate+up+down
    expected = 2 * 2 * per_layer * ctx + 2 * 2 * 4 * 32 * ctx**2 + 2 * 2048 * 128
    assert c.prefill_flops(ctx) == expected


def test_decode_bytes_llama3_8b_at_32k():
    c = PRESETS["llama3-8b"]
    assert c.decode_bytes(32768) == pytest.approx(19.3e9, rel=1e-2)
    # weights without the embedding table, plus K and V of 32 layers x 8 heads x 128 dims per position
    kv_per_token = 2 * 32 * 8 * 128 * 2
    assert c.kv_bytes_per_token() == kv_per_token
    assert c.decode_bytes(32768) - c.decode_bytes(0) == kv_per_token * 32768
    assert c.decode_bytes(0) == (8_030_261_248 - 128256 * 4096) * 2


def test_tied_embeddings_count_once():
    c = dataclasses.replace(PRESETS["tiny"], tie_embeddings=True)
    untied = PRESETS["tiny"]
    assert untied.param_count() - c.param_count() == untied.vocab_size * untied.hidden_size
    # the tied table is read once per decode step, as lm_head
    assert c.decode_bytes(0) == untied.decode_bytes(0)


def test_heads_must_divide():
    with pytest.raises(ValueError, match="n_kv_heads"):
        dataclasses.replace(PRESETS["tiny"], n_kv_heads=3)


# --- HF config ----------------------------------------------------------------------------
def test_from_hf_of_published_llama3_matches_preset():
    c = ModelConfig.from_hf(LLAMA3_8B_HF, name="llama3-8b")
    p = PRESETS["llama3-8b"]
    for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
              "rope_theta", "rms_eps", "tie_embeddings", "max_position_embeddings"):
        assert getattr(c, f) == getattr(p, f), f
    assert c.param_count() == p.param_count()
    assert llama3_inv_freq(c) == llama3_inv_freq(p)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_from_hf_to_hf_is_stable(name):
    c = PRESETS[name]
    hf = c.to_hf()
    again = ModelConfig.from_hf(json.loads(json.dumps(hf)), name=name)
    assert again.to_hf() == hf
    assert again.param_count() == c.param_count()
    assert llama3_inv_freq(again) == llama3_inv_freq(c)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_from_hf_to_hf_round_trip_gives_the_same_config(name):
    c = PRESETS[name]
    assert ModelConfig.from_hf(c.to_hf(), name=c.name) == c


def test_from_hf_defaults_and_unsupported_scaling():
    base = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "intermediate_size": 128}
    c = ModelConfig.from_hf(base)
    assert (c.n_kv_heads, c.head_dim, c.rope_theta, c.rope_scaling, c.tie_embeddings) == (4, 16, 10000.0, None, False)
    assert ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "default"}}).rope_scaling is None
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


# --- load_config ----------------------------------------------------------------------------
def test_load_config_preset_is_the_preset():
    assert load_config("tiny") is PRESETS["tiny"]


def test_load_config_of_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_HF))
    c = load_config(str(tmp_path))
    assert c.name == tmp_path.name  # as a record names it: no folder of this machine (greta.paths.record_name)
    assert c.param_count() == 8_030_261_248
    assert c.n_kv_heads == 8 and c.rope_theta == 500000.0


def test_load_config_unknown_model_is_one_line_value_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError) as ei:
        load_config(str(missing))
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(missing) in msg and "tiny" in msg
    # a directory without config.json is no model either
    with pytest.raises(ValueError):
        load_config(str(tmp_path))


# --- llama3 RoPE scaling ----------------------------------------------------------------------
def _hf_style_llama3(theta, d, factor, lo, hi, old):
    """Hand computation, written the way HF's _compute_llama3_parameters is (band masks)."""
    out = []
    for i in range(0, d, 2):
        f = theta ** (-i / d)
        wavelen = 2 * math.pi / f
        lo_wl, hi_wl = old / lo, old / hi
        llama = f / factor if wavelen > lo_wl else f
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = not wavelen < hi_wl and not wavelen > lo_wl
        out.append(smoothed if medium else llama)
    return out


@pytest.mark.parametrize("name", ["llama3-8b", "tiny"])
def test_llama3_inv_freq_bands(name):
    c = PRESETS[name]
    s = c.rope_scaling
    d = c.head_dim
    got = llama3_inv_freq(c)
    raw = [c.rope_theta ** (-i / d) for i in range(0, d, 2)]
    assert len(got) == d // 2
    hi_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    lo_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    bands = {"high": 0, "low": 0, "mid": 0}
    for f, g in zip(raw, got):
        wl = 2 * math.pi / f
        if wl < hi_wl:  # high frequency: unchanged
            assert g == pytest.approx(f, rel=1e-14)
            bands["high"] += 1
        elif wl > lo_wl:  # low frequency: divided by the factor
            assert g == pytest.approx(f / s["factor"], rel=1e-14)
            bands["low"] += 1
        else:  # in between: strictly between f/factor and f
            assert f / s["factor"] < g < f
            bands["mid"] += 1
    assert all(bands.values()), bands  # the test covers all three bands
    expected = _hf_style_llama3(c.rope_theta, d, s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                s["original_max_position_embeddings"])
    assert got == pytest.approx(expected, rel=1e-12)


def test_llama3_inv_freq_known_values():
    c = PRESETS["llama3-8b"]
    got = llama3_inv_freq(c)
    assert got[0] == 1.0
    assert got[-1] == pytest.approx(500000.0 ** (-126 / 128) / 8.0, rel=1e-12)
    # index 20: wavelength 2*pi*theta^(40/128) ~ 379 < 8192/4 -> unchanged
    f20 = 500000.0 ** (-40 / 128)
    assert 2 * math.pi / f20 < 2048 and got[20] == pytest.approx(f20, rel=1e-14)
    # index 30: wavelength ~ 2948, between 2048 and 8192 -> smoothed
    f30 = 500000.0 ** (-60 / 128)
    wl = 2 * math.pi / f30
    assert 2048 < wl < 8192
    smooth = (8192 / wl - 1.0) / (4.0 - 1.0)
    assert got[30] == pytest.approx((1 - smooth) * f30 / 8 + smooth * f30, rel=1e-12)


def test_no_scaling_leaves_frequencies_alone():
    c = PRESETS["llama2-7b"]
    assert llama3_inv_freq(c) == pytest.approx([10000.0 ** (-i / 128) for i in range(0, 128, 2)], rel=1e-14)
