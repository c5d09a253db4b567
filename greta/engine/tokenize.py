"""Text prompts through a checkpoint's tokenizer.json (the `tokenizers` library: pip install greta[models]).

The probe's prompt is one of:
  synthetic          ctx seeded uniform ids (greta.engine.prompt);
  a token-id file    the prompt param names it (greta.engine.prompt);
  text               prompt_file (a UTF-8 text file), or prompt=hello: the original engine's 'hello ' x ctx.
Text is tokenized with the tokenizer param (a tokenizer.json, a directory holding one, or a .gguf file), else
tokenizer.json beside the model (in the checkpoint directory, or in the .gguf file's folder), else a GGUF
model's own tokenizer (engine.gguf_tokenizer: tokenizer.ggml.* of the file; e.g. model=smollm2), with the tokenizer's own special tokens (e.g. Llama-3's BOS), then
truncated to ctx ids, or padded to ctx by repeating the text's ids (without specials) after it. A text
prompt without a tokenizer is refused (greta.probe.preflight, before the run; here too).
prompt_info() describes the result for the record: source, token counts and a sha256 of the ids.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

HELLO = "hello "


def find_tokenizer(model: str, tokenizer: str = "") -> Path | None:
    """The tokenizer for text prompts: the tokenizer param (a file, or a directory holding tokenizer.json),
    else tokenizer.json beside model, else model's own .gguf file (its tokenizer.ggml.* metadata)."""
    from greta.engine.source import model_path

    if tokenizer:
        p = Path(tokenizer)
        return p / "tokenizer.json" if p.is_dir() else p
    try:
        m = Path(model_path(model))
    except ValueError:  # a real model that is not installed: the model check says so
        return None
    t = (m.parent if m.suffix == ".gguf" else m) / "tokenizer.json"
    if t.is_file():
        return t
    return m if m.suffix == ".gguf" and m.is_file() else None


def load_tokenizer(path):
    """A tokenizers.Tokenizer from a tokenizer.json, or built from a .gguf file's own metadata."""
    if Path(path).suffix == ".gguf":
        from greta.engine.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(path)  # GGUFError, a one-line ValueError
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("text prompts need the tokenizers package: pip install greta[models]") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
        raise ValueError(f"tokenizer {path} cannot be read ({' '.join(str(e).split())[:160]})") from None


def tokenize_to_ctx(text: str, tokenizer_path, ctx: int, vocab: int) -> tuple[torch.Tensor, int]:
    """(ctx ids, how many ids the text itself gave). One-line ValueError when it can't be done."""
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode(text).ids
    n_text = len(ids)
    if n_text < ctx:
        body = tok.encode(text, add_special_tokens=False).ids
        if not body:
            raise ValueError(f"the prompt text tokenizes to no tokens with {tokenizer_path}; give a non-empty text")
        reps = -(-(ctx - n_text) // len(body))
        ids = ids + body * reps
    arr = np.array(ids[:ctx], dtype=np.int64)
    if arr.max() >= vocab:
        raise ValueError(f"tokenizer {tokenizer_path} gives id {int(arr.max())}, outside the model's vocab_size {vocab}")
    return torch.from_numpy(arr), n_text


def ids_sha256(ids: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(ids.cpu().numpy().astype("<i8").tobytes()).hexdigest()


def make_prompt_from_params(p: dict, vocab: int) -> tuple[torch.Tensor, dict]:
    """The probe's prompt ids [ctx] and what the record says about them."""
    from greta.paths import resolve
    from greta.engine.prompt import make_prompt

    ctx, spec, text_file = p["ctx"], p["prompt"], p["prompt_file"]
    info: dict = {}
    if text_file or spec == "hello":
        tok = find_tokenizer(p["model"], p["tokenizer"])
        what = f"prompt_file {text_file}" if text_file else "'hello ' x ctx"
        if tok is None:  # preflight refuses this first; never substitute other ids for the text asked for
            raise ValueError(f"text prompt ({what}) needs a tokenizer, and model {p['model']} has no tokenizer.json beside "
                             "it nor a .gguf tokenizer of its own; pass -p tokenizer=<dir with tokenizer.json>")
        text = resolve(text_file).read_text(encoding="utf-8") if text_file else HELLO * ctx
        ids, n_text = tokenize_to_ctx(text, tok, ctx, vocab)
        info = {"prompt_source": "text+tokenizer", "prompt_text": what, "tokenizer": str(tok),
                "prompt_text_tokens": n_text,
                "prompt_fit": "truncated" if n_text > ctx else ("padded by repeating the text" if n_text < ctx else "exact")}
    else:
        ids = make_prompt(spec, ctx, vocab, p["seed"])
        info = {"prompt_source": "synthetic"} if spec == "synthetic" else {"prompt_source": "token file", "prompt_file": spec}
    info.update(prompt_tokens=int(ids.numel()), prompt_ids_sha256=ids_sha256(ids))
    return ids, info
