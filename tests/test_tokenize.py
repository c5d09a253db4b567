"""Text prompts (greta.engine.tokenize): a tiny `tokenizers` WordLevel tokenizer saved as tokenizer.json, the
'hello ' x ctx prompt and prompt_file texts truncated or padded to ctx, the refusal of a text prompt without a
tokenizer, the record's prompt metadata, and the params that select them."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tokenizers")

from greta.probe.preflight import preflight  # noqa: E402
from greta.record.params import ParamError, load_params  # noqa: E402
from greta.engine.tokenize import ids_sha256, make_prompt_from_params, tokenize_to_ctx  # noqa: E402

VOCAB = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3, "the": 4, "cat": 5}


def write_tokenizer(d, vocab=VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def params(model, ctx=10, **kw):
    return load_params(None, {"model": str(model), "ctx": ctx, **kw})


def test_hello_prompt_is_truncated_to_ctx(tmp_path):
    write_tokenizer(tmp_path)
    ids, info = make_prompt_from_params(params(tmp_path, ctx=10, prompt="hello"), vocab=100)
    assert ids.tolist() == [1] + [2] * 9  # BOS from the tokenizer's template, then 'hello' x 9
    assert info["prompt_source"] == "text+tokenizer" and info["prompt_fit"] == "truncated"
    assert info["prompt_text_tokens"] == 11 and info["prompt_tokens"] == 10
    assert info["prompt_ids_sha256"] == ids_sha256(ids)


def test_prompt_file_is_padded_by_repeating_the_text(tmp_path):
    write_tokenizer(tmp_path / "ckpt")
    f = tmp_path / "p.txt"
    f.write_text("the cat\nhello world")
    ids, info = make_prompt_from_params(params(tmp_path / "ckpt", ctx=11, prompt_file=str(f)), vocab=100)
    assert ids.tolist() == [1, 4, 5, 2, 3, 4, 5, 2, 3, 4, 5]
    assert info["prompt_fit"] == "padded by repeating the text" and info["prompt_text_tokens"] == 5


def test_tokenizer_param_and_gguf_neighbour(tmp_path):
    tj = write_tokenizer(tmp_path / "tok")
    a, _ = make_prompt_from_params(params("tiny", ctx=4, prompt="hello", tokenizer=str(tj)), vocab=100)
    b, _ = make_prompt_from_params(params("tiny", ctx=4, prompt="hello", tokenizer=str(tj.parent)), vocab=100)
    gguf = tmp_path / "tok" / "model.gguf"  # tokenizer.json beside a .gguf file is found
    c, info = make_prompt_from_params(params(gguf, ctx=4, prompt="hello"), vocab=100)
    assert a.tolist() == b.tolist() == c.tolist() == [1, 2, 2, 2]
    assert info["tokenizer"] == tj.name  # as a record names it: no folder of this machine


def test_without_tokenizer_a_text_prompt_is_refused_not_replaced(tmp_path):
    """It used to fall back to seeded synthetic ids silently; now preflight refuses it, and so does this."""
    with pytest.raises(ValueError) as e:
        make_prompt_from_params(params(tmp_path, ctx=50, prompt="hello", seed=3), vocab=100)
    assert "-p tokenizer=<dir with tokenizer.json>" in str(e.value) and "\n" not in str(e.value)


def test_synthetic_and_token_file_sources(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("5 6 7 8")
    ids, info = make_prompt_from_params(params("tiny", ctx=3, prompt=str(f)), vocab=100)
    assert ids.tolist() == [5, 6, 7] and info["prompt_source"] == "token file"
    s1, i1 = make_prompt_from_params(params("tiny", ctx=30, seed=1), vocab=100)
    s2, i2 = make_prompt_from_params(params("tiny", ctx=30, seed=2), vocab=100)
    assert i1["prompt_source"] == "synthetic" and i1["prompt_ids_sha256"] != i2["prompt_ids_sha256"]


def test_ids_beyond_the_model_vocab_are_refused(tmp_path):
    tj = write_tokenizer(tmp_path)
    with pytest.raises(ValueError) as e:
        tokenize_to_ctx("the cat", tj, 5, vocab=4)
    assert "vocab_size 4" in str(e.value) and "\n" not in str(e.value)


def test_unreadable_tokenizer_is_one_line_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError) as e:
        tokenize_to_ctx("hello", bad, 5, vocab=100)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


# --- params ------------------------------------------------------------------------------------------------
def test_params_accept_text_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("hello")
    assert load_params(None, {"prompt": "hello"}).prompt == "hello"
    assert load_params(None, {"prompt_file": str(f)}).prompt_file == str(f)


@pytest.mark.parametrize("key,value", [("prompt_file", "missing.txt"), ("tokenizer", "no/such/tokenizer.json"),
                                       ("model", "no/such/model.gguf"), ("prompt", "helo")])
def test_params_refuse_missing_text_prompt_files(key, value):
    with pytest.raises(ParamError) as e:
        preflight(load_params(None, {key: value}))
    assert f"param {key}=" in str(e.value) and "\n" not in str(e.value)


# --- end to end: the record says what the prompt was ----------------------------------------------------------
def test_probe_record_carries_prompt_metadata(tmp_path, small_params, tiny_cfg, tiny_weights):
    from greta.probe.runner import run_probe
    from greta.engine.weights import save_checkpoint

    d = save_checkpoint(tiny_weights(), tiny_cfg, tmp_path / "ckpt")
    write_tokenizer(d)
    p = small_params(model=str(d), prompt="hello", ctx=128, gen=4, span=2)
    run_dir = run_probe(p, out_root=tmp_path / "out", progress=False)
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["weights_source"] == "checkpoint"
    pr = meta["prompt"]
    assert pr["prompt_source"] == "text+tokenizer" and pr["prompt_tokens"] == 128 and pr["prompt_text_tokens"] == 129
    assert pr["prompt_ids_sha256"] == ids_sha256(torch.tensor([1] + [2] * 127))
