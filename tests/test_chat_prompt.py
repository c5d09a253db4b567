"""The chat param: a user message rendered with the model's chat template as the prompt, through params files,
-p, papermill and the record (greta.engine.tokenize.chat_prompt, greta.probe.continuation,
greta.reports.text_section). A tiny WordLevel tokenizer with a tokenizer_config.json chat template stands in
for a real model's; tests/test_smollm2_audit.py runs the real one."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from greta.engine.tokenize import chat_prompt, make_prompt_from_params  # noqa: E402
from greta.probe.continuation import continuation  # noqa: E402
from greta.probe.preflight import preflight  # noqa: E402
from greta.record.params import ParamError, load_params, parse_overrides  # noqa: E402
from greta.reports.text_section import text_section  # noqa: E402
from tests.test_tokenize import write_tokenizer  # noqa: E402

VOCAB = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3, "the": 4, "cat": 5, "user": 6, "bot": 7, ":": 8, "system": 9}
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}bot :{% endif %}"
HEAD, TAIL = [1, 9, 8], [6, 8, 2, 4, 5, 7, 8]  # <s> system :   user : hello the cat bot :


def model_dir(tmp_path, template=TEMPLATE):
    d = tmp_path / "ckpt"
    write_tokenizer(d, VOCAB)
    if template is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    return d


def test_chat_follows_a_document_in_the_system_message_and_ends_the_prompt(tmp_path):
    d = model_dir(tmp_path)
    ids, info = chat_prompt("hello the cat", str(d), "", ctx=15, vocab=100, document="world cat", source="doc.txt")
    assert ids.tolist() == HEAD + [3, 5, 3, 5, 3] + TAIL  # the document's ids repeated to fill ctx
    assert info["text"] == "system : [document: 5 tokens of doc.txt] user : hello the cat bot :"
    assert info["chat"] == "hello the cat" and info["prompt_text_tokens"] == 10
    exact, _ = chat_prompt("hello the cat", str(d), "", ctx=10, vocab=100, document="world")
    assert exact.tolist() == HEAD + TAIL


def test_chat_reaches_the_prompt_from_params_files_and_overrides(tmp_path):
    d = model_dir(tmp_path)
    f = tmp_path / "p.yaml"
    doc = tmp_path / "doc.txt"
    doc.write_text("world")
    f.write_text(f"model: {d}\nctx: 12\ngen: 4\nspan: 2\nchat: hello the cat\nprompt_file: {doc}\n")
    p = load_params(f)
    assert p.chat == "hello the cat"
    ids, info = make_prompt_from_params(p, vocab=100)
    assert ids.tolist() == HEAD + [3, 3] + TAIL and info["document"] == f"prompt_file {doc}"
    q = load_params(f, parse_overrides(["chat=the cat = hello"]))  # the first '=' splits key from value
    assert q.chat == "the cat = hello"


@pytest.mark.parametrize("over,words", [
    ({"chat": "   "}, "only blanks"),
    ({"chat": "hi", "prompt": "hello"}, "keep one"),
])
def test_bad_chat_params_are_one_line(over, words):
    with pytest.raises(ParamError) as e:
        load_params(None, over)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_chat_without_a_tokenizer_or_template_or_room_is_one_line_before_the_run(tmp_path):
    cases = [({"chat": "hello"}, "no tokenizer.json"),  # the tiny preset: no tokenizer
             ({"tokenizer": str(model_dir(tmp_path / "a", template=None)), "chat": "hello"}, "has none"),
             ({"tokenizer": str(model_dir(tmp_path / "b")), "chat": "hello " * 20, "ctx": 8}, "raise -p ctx to 27")]
    for over, words in cases:
        with pytest.raises(ParamError) as e:
            preflight(load_params("params/cpu_default.yaml", over))
        assert words in str(e.value) and str(e.value).startswith("param chat") and "\n" not in str(e.value)


class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)


def test_continuation_names_each_paths_text_and_the_first_difference(tmp_path, monkeypatch):
    import greta.engine.tokenize as tk

    monkeypatch.setattr(tk, "find_tokenizer", lambda model, tokenizer="": tmp_path / "tokenizer.json")
    monkeypatch.setattr(tk, "load_tokenizer", lambda path: _Tok())
    ref = np.zeros((3, 6), np.float32)
    ref[[0, 1, 2], [4, 2, 5]] = 1.0
    dec = ref.copy()
    ref_out = {"tokens": [4, 2, 1, 3], "reference_logits": ref, "decode_logits": dec}
    p = load_params(None, {})
    c = continuation(p, ref_out)
    assert c["decode"]["text"] == "t4 t2 t1 t3" and c["prefill"]["text"] == "t4 t2 t5"
    assert c["first_difference"] == 2 and c["top5_at_first_difference"]["prefill"][0]["id"] == 5
    ref_out["tokens"] = [4, 2, 5, 0]
    assert continuation(p, ref_out)["first_difference"] is None


def test_outside_text_is_escaped_in_the_report():
    hostile = "<script>alert(1)</script>\nVerdict: **PASS_EQUIV**\n# heading\x1b[31m"
    meta = {"prompt": {"prompt_source": "chat+template", "chat": hostile, "text": hostile, "prompt_text_tokens": 3,
                       "prompt_tokens": 8, "prompt_fit": "exact"},
            "continuation": {"span": 2, "first_difference": 1, "decode": {"tokens": [1, 2], "text": hostile},
                             "prefill": {"tokens": [1, 3], "text": "ok"},
                             "top5_at_first_difference": {"decode": [{"id": 2, "token": "<b>", "logit": 1.0}],
                                                          "prefill": [{"id": 3, "token": "|x|", "logit": 2.0}]}}}
    out = "\n".join(text_section(meta))
    assert "<script>" not in out and "**PASS" not in out and "\x1b" not in out
    assert "`'<b>'`" in out  # a token in a code span: shown as written, never a tag
    assert "\n# heading" not in out and "&lt;script&gt;" in out and "first choose differently at step 1" in out
