"""The text of a B3.77 run: each path's tokens decoded by the model's tokenizer, for the record and its pages.

  decode   the decode path's greedy tokens: the prefill's first token, then `gen` one-token steps;
  prefill  the prefill path's own choices over the span: the argmax of the teacher-forced reference at each
           compared position (fed the decode path's tokens before it), so where it differs from decode, the
           two paths would have continued differently from there.
At the first position where the two choices differ, each path's top-5 tokens with their logits.

The tokenizer is the prompt's (greta.engine.tokenize.find_tokenizer: the tokenizer param, tokenizer.json beside
the model, or a .gguf file's own); a model without one (the presets) gets no text. Special tokens are kept in
the text (<|im_end|> says where the model stopped its answer).
"""
from __future__ import annotations

import numpy as np

from greta.paths import record_name

TOP = 5


def continuation(params, ref: dict) -> dict | None:
    """metadata.json's `continuation` from the reference phase's results (None without a tokenizer; a
    tokenizer that cannot be read is an `error` line, never a failed record)."""
    from greta.engine.tokenize import find_tokenizer, load_tokenizer
    from greta.terminal import brief

    path = find_tokenizer(params.model, params.tokenizer)
    if path is None:
        return None
    try:
        tok = load_tokenizer(path)
    except (ValueError, OSError) as e:
        return {"tokenizer": record_name(path), "error": brief(e)}

    def text(ids) -> str:
        return tok.decode([int(i) for i in ids], skip_special_tokens=False)

    decode = [int(t) for t in ref["tokens"]]
    prefill = [int(t) for t in np.asarray(ref["reference_logits"]).argmax(axis=-1)]
    span = len(prefill)
    first = next((i for i in range(span) if prefill[i] != decode[i]), None)
    out = {"tokenizer": record_name(path), "span": span, "first_difference": first,
           "decode": {"tokens": decode, "text": text(decode), "span_text": text(decode[:span])},
           "prefill": {"tokens": prefill, "text": text(prefill)}}
    if first is not None:
        out["top5_at_first_difference"] = {name: _top(np.asarray(ref[key][first]), text)
                                           for name, key in (("decode", "decode_logits"), ("prefill", "reference_logits"))}
    return out


def _top(logits: np.ndarray, text) -> list[dict]:
    ids = np.argsort(-logits, kind="stable")[:TOP]
    return [{"id": int(i), "token": text([i]), "logit": float(logits[i])} for i in ids]
