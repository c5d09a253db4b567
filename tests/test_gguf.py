"""greta.engine.gguf: Llama GGUF files (Qwen2's: tests/test_qwen2.py) written by the tests themselves (gguf.GGUFWriter), their metadata mapped to a
ModelConfig, F32/F16/BF16 tensors loaded and block types dequantized (checked against gguf.quants, the gguf
package's own numpy code; every block type on random blocks in tests/test_gguf_quants.py), q/k rows un-permuted, and logits held against transformers on the source model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from greta.engine.source import load_config  # noqa: E402
from greta.engine.gguf import GGUFError, gguf_config, load_gguf, permute_rope_rows, unpermute_rope_rows  # noqa: E402
from greta.engine.gguf_quants import KNOWN_TYPES, dequantize  # noqa: E402
from greta.engine.layout import layout_of  # noqa: E402
from greta.engine.weights import tensor_names  # noqa: E402
from greta.checks.oracle import agreement, greta_logits, hf_logits  # noqa: E402
from greta.engine.prompt import synthetic_prompt  # noqa: E402


# --- a Q4_K packer for the tests (the gguf package only dequantizes Q4_K) ---------------------------------
def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of fp32 (length a multiple of 256) -> Q4_K bytes [rows, 144 * k], ggml's block layout."""
    rows = x.shape[0]
    b = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(b.min(-1), 0.0)
    scale = (b.max(-1) - lo) / 15.0
    d = np.float16(scale.max(-1, keepdims=True) / 63.0).astype(np.float32)
    dmin = np.float16((-lo).max(-1, keepdims=True) / 63.0).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.round(scale / d)), 0, 63).astype(np.uint8)
        m = np.clip(np.nan_to_num(np.round(-lo / dmin)), 0, 63).astype(np.uint8)
        step = d * sc
        q = np.clip(np.nan_to_num(np.round((b + (dmin * m)[..., None]) / step[..., None])), 0, 15).astype(np.uint8)
    scales = np.zeros((b.shape[0], 12), np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), scales, qs], axis=1)
    return out.reshape(rows, -1)


def encode(x: np.ndarray, kind) -> np.ndarray:
    if kind == Q.Q4_K:
        return quantize_q4_k(x)
    return gguf.quants.quantize(x.astype(np.float32), kind)


def reference(x: np.ndarray, kind) -> torch.Tensor:
    """What a loader must give for x stored as kind: the gguf package's own dequantization."""
    return torch.from_numpy(gguf.quants.dequantize(encode(x, kind), kind).reshape(x.shape).astype(np.float32))


# --- dequantizers ----------------------------------------------------------------------------------
def test_q4_k_round_trip_of_the_test_packer():
    x = np.random.default_rng(2).normal(size=(4, 512)).astype(np.float32)
    raw = quantize_q4_k(x)
    got = dequantize("Q4_K", torch.from_numpy(raw)).reshape(4, 512)
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_K).reshape(4, 512)))
    err = float((got - torch.from_numpy(x)).abs().max())
    assert 0 < err < 0.6  # 4-bit: a sizeable but bounded error (range ~6 sigma / 15 steps, plus 6-bit scales)


def test_rope_row_permutation_round_trips():
    w = torch.arange(4 * 16 * 3, dtype=torch.float32).reshape(64, 3)
    p = permute_rope_rows(w, 4)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_rope_rows(p, 4), w)
    # llama.cpp's layout: per head, rows 0, D/2, 1, D/2+1, ... (pairs interleaved)
    assert p[:4, 0].tolist() == [w[0, 0], w[8, 0], w[1, 0], w[9, 0]]


# --- writing GGUF files from a transformers checkpoint ---------------------------------------------
def write_gguf(path, hf_dir, kind=Q.F32, *, rope_freqs=True, drop=(), arch=None, truncate=0, metadata=None):
    """A GGUF file from an HF checkpoint, as convert_hf_to_gguf writes one (arch: its family's, unless given;
    tensor names: the family's engine.layout): a Llama's q/k rows permuted,
    norms in F32, 2-D weights as kind, llama3 scaling as a rope_freqs tensor; metadata(writer) adds more keys
    (a tokenizer)."""
    from safetensors.torch import load_file

    from greta.engine.config import inv_freq

    cfg = load_config(str(hf_dir))
    sd = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(path), arch or layout_of(cfg).gguf_arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if metadata:
        metadata(w)
    hf_names, gguf_names = tensor_names(cfg, "hf"), tensor_names(cfg, "gguf")
    names = {hf_names[role]: gguf_names[role] for role in hf_names}
    permuted = layout_of(cfg).gguf_rope_permuted  # llama.cpp permutes a Llama's q/k rows, not a Qwen2's
    stored = {}
    for hf_name, t in sd.items():
        name = names[hf_name]
        if name in drop:
            continue
        if permuted and name.endswith("attn_q.weight"):
            t = permute_rope_rows(t, cfg.n_heads)
        elif permuted and name.endswith("attn_k.weight"):
            t = permute_rope_rows(t, cfg.n_kv_heads)
        x = t.float().numpy()
        k = kind if x.ndim == 2 else Q.F32
        if k == Q.F32:
            w.add_tensor(name, x)
        elif k == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, encode(x, k), raw_dtype=k)
        stored[name] = (x, k)
    if rope_freqs and cfg.rope_scaling:
        base = [1.0 / cfg.rope_theta ** (i / cfg.head_dim) for i in range(0, cfg.head_dim, 2)]
        divisors = np.array([b / s for b, s in zip(base, inv_freq(cfg))], dtype=np.float32)
        w.add_tensor("rope_freqs.weight", divisors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - truncate)
    return path, stored


def test_gguf_config_matches_the_hf_config(tmp_path, hf_checkpoint):
    d = hf_checkpoint("gqa4")
    path, _ = write_gguf(tmp_path / "m.gguf", d)
    c, hf = load_config(str(path)), load_config(str(d))
    assert c == gguf_config(path)
    for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
              "rope_theta", "tie_embeddings", "max_position_embeddings"):
        assert getattr(c, f) == getattr(hf, f), f
    assert math.isclose(c.rms_eps, hf.rms_eps, rel_tol=1e-6)


@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda k: k.name)
def test_gguf_tensors_load_as_the_gguf_package_dequantizes_them(tmp_path, hf_checkpoint, kind):
    d = hf_checkpoint("gqa4")
    path, stored = write_gguf(tmp_path / "m.gguf", d, kind)
    cfg = load_config(str(path))
    w = load_gguf(path, cfg, torch.float32, "cpu")
    ref = {n: reference(x, k) for n, (x, k) in stored.items()}
    assert torch.equal(w["embed"], ref["token_embd.weight"])
    assert torch.equal(w["0.w2"], ref["blk.0.ffn_down.weight"])
    q_rows = cfg.n_heads * cfg.head_dim
    assert torch.equal(w["1.wqkv"][:q_rows], unpermute_rope_rows(ref["blk.1.attn_q.weight"], cfg.n_heads))
    assert torch.equal(w["norm"], ref["output_norm.weight"])


def test_gguf_q4_k_model_loads(tmp_path, hf_checkpoint):
    """Q4_K needs rows of 256: a wider model."""
    d = hf_checkpoint("wide", hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    path, stored = write_gguf(tmp_path / "m.gguf", d, Q.Q4_K)
    cfg = load_config(str(path))
    w = load_gguf(path, cfg, torch.bfloat16, "cpu")
    assert w["0.w13"].dtype == torch.bfloat16
    want = torch.cat([reference(*stored["blk.0.ffn_gate.weight"]), reference(*stored["blk.0.ffn_up.weight"])])
    assert torch.equal(w["0.w13"], want.to(torch.bfloat16))


@pytest.mark.parametrize("name,overrides", [
    ("gqa4", {}),
    ("llama3", dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    ("tied", dict(tie_word_embeddings=True)),
])
def test_gguf_f32_logits_match_transformers(tmp_path, hf_checkpoint, name, overrides):
    """Metadata, q/k un-permutation, tied output and rope_freqs all matter here: fp32 agreement to 1e-4."""
    d = hf_checkpoint(name, **overrides)
    path, _ = write_gguf(tmp_path / "m.gguf", d)
    cfg = load_config(str(path))
    assert cfg.tie_embeddings == ("tie" in name)
    assert (cfg.rope_scaling is not None) == (name == "llama3")
    tokens = synthetic_prompt(130, cfg.vocab_size, 0)
    oracle = hf_logits(str(d), tokens, torch.float32)
    pre, dec = greta_logits(cfg, load_gguf(path, cfg, torch.float32, "cpu"), tokens, 4)
    for got, want in ((pre, oracle), (dec, oracle[-4:])):
        a = agreement(got, want)
        assert a["rel"] < 1e-4 and a["top1_agreement"] == 1.0, a


def test_gguf_without_unpermuting_would_fail_the_oracle(tmp_path, hf_checkpoint):
    """Negative control: the same file read without undoing llama.cpp's q/k permutation is far off."""
    d = hf_checkpoint("gqa4")
    path, _ = write_gguf(tmp_path / "m.gguf", d)
    cfg = load_config(str(path))
    w = load_gguf(path, cfg, torch.float32, "cpu")
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        q, k, v = w[f"{i}.wqkv"].split([q_rows, kv_rows, kv_rows])
        w[f"{i}.wqkv"] = torch.cat([permute_rope_rows(q, cfg.n_heads), permute_rope_rows(k, cfg.n_kv_heads), v])
    tokens = synthetic_prompt(130, cfg.vocab_size, 0)
    pre, _ = greta_logits(cfg, w, tokens, 4)
    assert agreement(pre, hf_logits(str(d), tokens, torch.float32))["rel"] > 1e-3


# --- errors: one line, naming the thing -------------------------------------------------------------------
def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_gguf_missing_tensor_is_named(tmp_path, hf_checkpoint):
    path, _ = write_gguf(tmp_path / "m.gguf", hf_checkpoint("gqa4"), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError) as e:
        load_gguf(path, load_config(str(path)), torch.float32, "cpu")
    assert "blk.1.ffn_up.weight" in _one_line(e)


def test_gguf_other_architecture_is_refused_by_name(tmp_path, hf_checkpoint):
    path, _ = write_gguf(tmp_path / "m.gguf", hf_checkpoint("gqa4"), arch="gemma")
    with pytest.raises(GGUFError) as e:
        load_config(str(path))
    assert "gemma" in _one_line(e) and "llama, qwen2" in _one_line(e)


def test_gguf_unsupported_tensor_type_is_named(tmp_path, hf_checkpoint):
    path, _ = write_gguf(tmp_path / "m.gguf", hf_checkpoint("gqa4"), Q.MXFP4)
    with pytest.raises(GGUFError) as e:
        load_gguf(path, load_config(str(path)), torch.float32, "cpu")
    msg = _one_line(e)
    assert "MXFP4" in msg and "token_embd.weight" in msg and all(k in msg for k in KNOWN_TYPES)


@pytest.mark.parametrize("cut", [100, 4096])  # into the last tensor's data; into the tensor table
def test_gguf_truncated_file_is_one_line_error(tmp_path, hf_checkpoint, cut):
    path, _ = write_gguf(tmp_path / "m.gguf", hf_checkpoint("gqa4"), truncate=cut)
    with pytest.raises(GGUFError) as e:
        load_gguf(path, gguf_config(path), torch.float32, "cpu")
    msg = _one_line(e)
    assert "truncated" in msg and "m.gguf" in msg


def test_gguf_missing_file_is_named(tmp_path):
    with pytest.raises(GGUFError) as e:
        load_gguf(tmp_path / "nope.gguf", None, torch.float32, "cpu")
    assert "nope.gguf" in _one_line(e)
