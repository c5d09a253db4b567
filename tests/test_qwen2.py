"""Qwen2, the second family of engine.layout (q/k/v biases, a tied or untied head, its own rope theta):

- the oracle: Greta against transformers' Qwen2ForCausalLM on small random checkpoints transformers writes
  itself (biases drawn nonzero: transformers inits them to zero), in fp32 and bf16, tied and untied; the
  negative control runs Greta without the q/k/v bias and must fail;
- kv_aligned=1: decode equals prefill bit for bit on qwen2-tiny with the tiled torch ops (bf16) and the Triton
  kernels under the interpreter (fp32), at tp 1 and 2 (gloo; Triton at tp 2 is marked slow: minutes), each
  with a control that fails; the tp=2 logits are tp=1's within rounding (the biases are cut with their heads);
- the layout: checkpoints and shards round-trip with the biases, and `model=qwen2-tiny` runs the probe.
"""
from __future__ import annotations

import dataclasses
import functools
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

from greta.engine.config import PRESETS, ModelConfig  # noqa: E402
from greta.engine.launch import finish, init_from_env, spawn  # noqa: E402
from greta.engine.prompt import synthetic_prompt  # noqa: E402
from greta.engine.runner import Runner  # noqa: E402
from greta.engine.source import load_config, load_model  # noqa: E402
from greta.paths import record_name  # noqa: E402
from greta.engine.tp import shard_weights, synthetic_shard  # noqa: E402
from greta.engine.weights import load_checkpoint, save_checkpoint, synthetic  # noqa: E402

CFG = PRESETS["qwen2-tiny"]
QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0, rms_norm_eps=1e-6)
CHECKPOINTS = {"qwen2": dict(QWEN2), "qwen2-tied": dict(QWEN2, tie_word_embeddings=True)}
ORACLE_CTX = 160


# --- the layout ----------------------------------------------------------------------------------------------
def test_the_presets_are_qwen2_shaped():
    big = PRESETS["qwen2-0.5b"]
    assert (big.family, big.n_layers, big.hidden_size, big.n_heads, big.n_kv_heads, big.intermediate_size,
            big.vocab_size, big.tie_embeddings, big.rope_theta) == ("qwen2", 24, 896, 14, 2, 4864, 151936, True, 1e6)
    assert 0.49e9 < big.param_count() < 0.5e9  # Qwen2-0.5B: 494M parameters, its biases included
    w = synthetic(CFG, 0, torch.float32, "cpu")
    q, kv = CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim
    assert w["0.bqkv"].shape == (q + 2 * kv,) and w["lm_head"] is w["embed"]
    assert sum(t.numel() for k, t in w.items() if k != "lm_head") == CFG.param_count()


def test_a_qwen2_checkpoint_and_its_shards_round_trip(tmp_path):
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    full = synthetic(cfg, 3, torch.float32, "cpu")
    path = save_checkpoint(full, cfg, tmp_path / "ckpt")
    assert load_config(str(path)) == dataclasses.replace(cfg, name=record_name(path))
    got = load_checkpoint(str(path), cfg, torch.float32, "cpu")
    assert set(got) == set(full) and all(torch.equal(got[k], full[k]) for k in full)
    for r in range(2):
        shard = load_model(str(path), 0, torch.float32, "cpu", shard=(r, 2)).weights
        want = shard_weights(cfg, full, r, 2)
        assert all(torch.equal(shard[k], want[k]) for k in want)
        assert torch.equal(synthetic_shard(cfg, 3, torch.float32, "cpu", r, 2)["1.bqkv"], want["1.bqkv"])
    q, kv = cfg.n_heads * cfg.head_dim // 2, cfg.n_kv_heads * cfg.head_dim // 2
    b = full["0.bqkv"].split([2 * q, 2 * kv, 2 * kv])  # rank 1 holds the second half of each of q, k, v
    assert torch.equal(shard_weights(cfg, full, 1, 2)["0.bqkv"], torch.cat([b[0][q:], b[1][kv:], b[2][kv:]]))


def test_a_sliding_window_or_unknown_family_is_refused_in_one_line():
    base = {**CFG.to_hf()}
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="model_type 'gemma' is not supported"):
        ModelConfig.from_hf({**base, "model_type": "gemma"})
    with pytest.raises(ValueError, match="Greta runs Qwen2ForCausalLM"):
        ModelConfig.from_hf({**base, "architectures": ["LlamaForCausalLM"]})


# --- the oracle: transformers' Qwen2ForCausalLM ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    return lambda name: hf_checkpoint(name, **CHECKPOINTS[name])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greta_matches_transformers_qwen2(ckpt, name, dtype):
    from greta.checks.oracle import compare, format_result

    d = str(ckpt(name))
    cfg = load_config(d)
    assert (cfg.family, cfg.tie_embeddings, cfg.rope_theta) == ("qwen2", name.endswith("tied"), 1e6)
    res = compare(d, ctx=ORACLE_CTX, dtype=dtype, steps=8)
    print(format_result(res))
    assert res["ok"] and res["architecture"] == "Qwen2ForCausalLM" and "Qwen2ForCausalLM" in format_result(res)
    if dtype == "float32":
        assert res["prefill"]["top1_agreement"] == res["decode"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_dropping_the_qkv_bias_fails_the_oracle(ckpt, name):
    """The negative control: the same weights run as a Llama (no q/k/v bias) are far outside the fp32 limit."""
    from greta.checks.oracle import compare

    d = str(ckpt(name))
    good = compare(d, ctx=ORACLE_CTX, dtype="float32")
    bad = compare(d, ctx=ORACLE_CTX, dtype="float32", cfg=dataclasses.replace(load_config(d), family="llama"),
                  oracle=good["oracle_logits"])
    assert good["ok"] and not bad["ok"]
    assert bad["prefill"]["rel"] > 100 * bad["prefill"]["limit_rel"]


def test_a_qwen2_gguf_file_matches_transformers(ckpt, tmp_path):
    """A Qwen2 GGUF (biases, q/k rows in HF's order: llama.cpp permutes only a Llama's) against transformers in
    fp32; the control reads its q/k rows as if permuted like a Llama's, and is far off."""
    pytest.importorskip("gguf")
    from greta.checks.oracle import agreement, greta_logits, hf_logits
    from greta.engine.gguf import load_gguf, unpermute_rope_rows
    from tests.test_gguf import write_gguf

    d = ckpt("qwen2")
    path, _ = write_gguf(tmp_path / "q.gguf", d)
    cfg = load_config(str(path))
    hf = load_config(str(d))
    assert cfg.family == "qwen2" and abs(cfg.rms_eps - hf.rms_eps) < 1e-12  # stored as float32
    assert cfg == dataclasses.replace(hf, name=record_name(path), rms_eps=cfg.rms_eps)
    w = load_gguf(path, cfg, torch.float32, "cpu")
    tokens = synthetic_prompt(130, cfg.vocab_size, 0)
    oracle = hf_logits(str(d), tokens, torch.float32)
    pre, dec = greta_logits(cfg, w, tokens, 4)
    for got, want in ((pre, oracle), (dec, oracle[-4:])):
        a = agreement(got, want)
        assert a["rel"] < 1e-4 and a["top1_agreement"] == 1.0, a
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        wq, wk, wv = w[f"{i}.wqkv"].split([q, kv, kv])
        w[f"{i}.wqkv"] = torch.cat([unpermute_rope_rows(wq, cfg.n_heads), unpermute_rope_rows(wk, cfg.n_kv_heads), wv])
    assert agreement(greta_logits(cfg, w, tokens, 4)[0], oracle)["rel"] > 1e-3


# --- kv_aligned=1: decode == prefill, tp 1 and 2 ----------------------------------------------------------------
CTX, SPAN, CHUNK = 70, 3, 32
MODES = {"torch": torch.bfloat16, "triton": torch.float32}  # the interpreter's bf16 tl.dot is wrong


def decode_and_prefill(tp, backend: str, perturb: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy decode logits at CTX-1.., prefill logits at the same positions, fed the same tokens)."""
    dtype = MODES[backend]
    w = synthetic_shard(CFG, 0, dtype, "cpu", tp.rank, tp.world) if tp else synthetic(CFG, 0, dtype, "cpu")
    prompt = synthetic_prompt(CTX, CFG.vocab_size, 5)

    def runner(p="none"):
        return Runner(CFG, w, max_tokens=CTX + SPAN, kv_aligned=1, chunk=CHUNK, kv_block=64, backend=backend,
                      perturb=p, tp=tp)

    m = runner(perturb)
    dec = [m.prefill(prompt)[0]]
    toks = [dec[0].argmax()]
    for j in range(SPAN - 1):
        dec.append(m.decode(toks[-1], CTX + j))
        toks.append(dec[-1].argmax())
    pre = runner().prefill(torch.cat([prompt, torch.stack(toks[:-1])]), keep=list(range(CTX - 1, CTX + SPAN - 1)))
    return torch.stack(dec), pre


def _rank_body(backend: str) -> dict:
    tp, _ = init_from_env("cpu", timeout_s=120)
    try:
        torch.set_num_threads(1)
        return {p: decode_and_prefill(tp, backend, p) for p in ("none", "rope_offset")}
    finally:
        finish()


@functools.lru_cache(maxsize=None)
def tp1(backend: str, perturb: str) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_and_prefill(None, backend, perturb)


@pytest.mark.parametrize("backend", list(MODES))
def test_qwen2_decode_equals_prefill_bit_for_bit_at_tp1(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    dec, pre = tp1(backend, "none")
    assert torch.equal(dec, pre)
    dec, pre = tp1(backend, "rope_offset")  # the control: decode at the wrong positions
    assert float((dec - pre).abs().max()) > 1e-2


def check_tp2(ranks: list[dict], backend: str) -> None:
    for rank in ranks:
        dec, pre = rank["none"]
        assert torch.equal(dec, pre), backend
        dec, pre = rank["rope_offset"]
        assert float((dec - pre).abs().max()) > 1e-2
    # sharding changes only the order of the wo/w2 sums: tp=1's logits within rounding (bf16: a few ulps of
    # logits up to ~40; fp32: ~1e-6 of them), where a bias cut away from its heads would move them by far more
    got, want = ranks[0]["none"][1], tp1(backend, "none")[1]
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < (0.05 if backend == "torch" else 1e-5), rel


def test_qwen2_decode_equals_prefill_bit_for_bit_at_tp2_torch():
    check_tp2(spawn(_rank_body, 2, args=("torch",), timeout_s=300), "torch")


@pytest.mark.slow
def test_qwen2_decode_equals_prefill_bit_for_bit_at_tp2_triton():
    """The interpreter in two ranks of one thread each: minutes."""
    pytest.importorskip("triton")
    ranks = spawn(_rank_body, 2, args=("triton",), timeout_s=600, env={"TRITON_INTERPRET": "1"})
    check_tp2(ranks, "triton")


# --- the probe --------------------------------------------------------------------------------------------------
def test_the_probe_runs_qwen2_tiny_at_tp2_and_verifies(tmp_path):
    from pathlib import Path

    from greta.checks.verify import verify
    from greta.probe.preflight import preflight
    from greta.probe.runner import run_probe
    from greta.record.params import ParamError, load_params

    over = {"model": "qwen2-tiny", "ctx": 125, "gen": 6, "span": 4, "prefill_chunk": 64, "kv_block": 32,
            "sampling_period_s": 0.2, "threads": 1, "tp": 2}
    with pytest.raises(ParamError, match="n_kv_heads=2"):
        load_params("params/cpu_default.yaml", {**over, "tp": 4})
    d = Path(run_probe(preflight(load_params("params/cpu_default.yaml", over)), out_root=tmp_path, progress=False))
    import json

    v = json.loads((d / "verdict.json").read_text())
    assert (v["verdict"], v["bit_exact"]) == ("PASS_EQUIV", True), v["reason"]
    assert json.loads((d / "metadata.json").read_text())["config"]["family"] == "qwen2"
    assert verify(d) == []
