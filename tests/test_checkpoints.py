"""HF safetensors checkpoints saved by transformers itself: single-file and sharded (index.json) loading,
dtype conversion, configs of the Llama generations (transformers 4 and 5 config.json forms), and every
error case as one line naming the file, tensor or value at fault."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from greta.engine.config import ModelConfig, inv_freq
from greta.engine.source import load_config
from greta.engine.weights import CheckpointError, checkpoint_files, load_checkpoint


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- loading ----------------------------------------------------------------------------------------
def test_sharded_checkpoint_loads_the_same_tensors(hf_checkpoint):
    from safetensors.torch import load_file

    single = hf_checkpoint("seed7", seed=7)
    sharded = hf_checkpoint("seed7-sharded", shard="40KB", seed=7)
    assert (sharded / "model.safetensors.index.json").is_file() and len(checkpoint_files(sharded)) > 2
    # same seed and config: the two directories hold the same model
    cfg = load_config(str(single))
    a = load_checkpoint(single, cfg, torch.float32, "cpu")
    b = load_checkpoint(sharded, load_config(str(sharded)), torch.float32, "cpu")
    assert a.keys() == b.keys()
    raw = load_file(str(single / "model.safetensors"))
    assert torch.equal(a["1.wqkv"], torch.cat([raw[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"]))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dtype_is_converted_on_load(hf_checkpoint):
    d = hf_checkpoint("gqa4")
    w = load_checkpoint(d, load_config(str(d)), torch.bfloat16, "cpu")
    assert {t.dtype for t in w.values()} == {torch.bfloat16}


def test_tied_checkpoint_has_no_lm_head_and_shares_the_table(hf_checkpoint):
    d = hf_checkpoint("tied", tie_word_embeddings=True)
    cfg = load_config(str(d))
    assert cfg.tie_embeddings
    w = load_checkpoint(d, cfg, torch.float32, "cpu")
    assert w["lm_head"] is w["embed"]


# --- configs -------------------------------------------------------------------------------------------
BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64}


def test_llama2_mha_config():
    c = ModelConfig.from_hf({**BASE, "rms_norm_eps": 1e-5})
    assert c.n_kv_heads == c.n_heads == 4 and c.rope_scaling is None and c.rms_eps == 1e-5


def test_transformers5_rope_parameters_form_equals_the_rope_scaling_form():
    s = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    old = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **s}})
    new = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", **s}})
    assert old == new and old.rope_theta == 500000.0 and old.rope_scaling == s
    plain = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"}})
    assert plain.rope_theta == 1234.0 and plain.rope_scaling is None


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_linear_and_dynamic_scaling_round_trip_through_to_hf(kind):
    c = ModelConfig.from_hf({**BASE, "rope_scaling": {"type": kind, "factor": 4.0}})
    assert c.rope_scaling == {"rope_type": kind, "factor": 4.0}
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_linear_divides_and_dynamic_depends_on_length():
    plain = ModelConfig.from_hf(BASE)
    lin = ModelConfig.from_hf({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    dyn = ModelConfig.from_hf({**BASE, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    assert inv_freq(lin) == pytest.approx([f / 4 for f in inv_freq(plain)])
    assert inv_freq(dyn, 64) == pytest.approx(inv_freq(plain))  # up to max_position_embeddings: unscaled
    assert inv_freq(dyn, 10) == pytest.approx(inv_freq(plain))
    long = inv_freq(dyn, 256)
    assert long[0] == pytest.approx(1.0) and all(a < b for a, b in zip(long[1:], inv_freq(plain)[1:]))


@pytest.mark.parametrize("kind", ["yarn", "longrope", "su"])
def test_other_rope_types_are_refused_by_name(tmp_path, kind):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "rope_scaling": {"rope_type": kind, "factor": 2.0}}))
    with pytest.raises(ValueError) as e:
        load_config(str(tmp_path))
    assert repr(kind) in one_line(e)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])
def test_unsupported_architecture_is_named(tmp_path, arch):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": [arch]}))
    with pytest.raises(ValueError) as e:
        load_config(str(tmp_path))
    assert arch in one_line(e)


# --- errors --------------------------------------------------------------------------------------------------
def test_missing_config_json(tmp_path, hf_checkpoint):
    d = copy(hf_checkpoint("gqa4"), tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, load_config(str(hf_checkpoint("gqa4"))), torch.float32, "cpu")
    assert "config.json" in one_line(e)


def test_missing_shard_is_named(tmp_path, hf_checkpoint):
    d = copy(hf_checkpoint("gqa4-sharded", shard="40KB"), tmp_path / "c")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, load_config(str(d)), torch.float32, "cpu")
    assert victim.name in one_line(e)


def _rewrite(d, edit):
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path, hf_checkpoint):
    d = copy(hf_checkpoint("gqa4"), tmp_path / "c")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, load_config(str(d)), torch.float32, "cpu")
    assert "model.layers.1.mlp.up_proj.weight" in one_line(e)


def test_extra_tensor_is_named(tmp_path, hf_checkpoint):
    d = copy(hf_checkpoint("gqa4"), tmp_path / "c")
    _rewrite(d, lambda t: t.__setitem__("model.layers.7.self_attn.q_proj.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, load_config(str(d)), torch.float32, "cpu")
    assert "model.layers.7.self_attn.q_proj.bias" in one_line(e)


def test_misshapen_tensor_is_named_with_both_shapes(tmp_path, hf_checkpoint):
    d = copy(hf_checkpoint("gqa4"), tmp_path / "c")
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 64)))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, load_config(str(d)), torch.float32, "cpu")
    msg = one_line(e)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[8, 64]" in msg and "[16, 64]" in msg  # 2 kv heads x 8


@pytest.mark.parametrize("cut", [10, 1000, None])  # inside the data, inside the data, inside the header
def test_truncated_or_corrupted_safetensors_is_named(tmp_path, hf_checkpoint, cut):
    d = copy(hf_checkpoint("gqa4"), tmp_path / "c")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-cut] if cut else data[:8] + b"{garbage" + data[16:])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, load_config(str(d)), torch.float32, "cpu")
    msg = one_line(e)
    assert "model.safetensors" in msg and "truncated or corrupted" in msg
