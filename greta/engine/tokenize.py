"""Text prompts through a checkpoint's tokenizer.json (the `tokenizers` library: pip install greta[models]).

The probe's prompt is one of:
  synthetic          ctx seeded uniform ids (greta.engine.prompt);
  a token-id file    the prompt param names it (greta.engine.prompt);
  text               prompt_file (a UTF-8 text file), or prompt=hello: the original engine's 'hello ' x ctx.
  chat               the chat param: a system message holding a document, then the user's message, rendered
                     with the model's chat template (a .gguf's tokenizer.chat_template, or chat_template.jinja /
                     tokenizer_config.json's chat_template beside a tokenizer.json;
                     greta.engine.gguf_tokenizer.render_chat, jinja2's sandbox) and its generation prompt, so
                     the prompt ends with the assistant's turn. The document is prompt_file's text, else
                     greta.engine.passage.PASSAGE; its ids are repeated or cut so that the prompt is ctx ids.
                     (A long context of anything else derails a small model: measured on SmolLM2-135M, copies
                     of the chat, or end-of-text / newline tokens before it, give no answer; a document does.)
Text is tokenized with the tokenizer param (a tokenizer.json, a directory holding one, or a .gguf file), else
tokenizer.json beside the model (in the checkpoint directory, or in the .gguf file's folder), else a GGUF
model's own tokenizer (engine.gguf_tokenizer: tokenizer.ggml.* of the file; e.g. model=smollm2), with the tokenizer's own special tokens (e.g. Llama-3's BOS), then
truncated to ctx ids, or padded to ctx by repeating the text's ids (without specials) after it. A text
prompt without a tokenizer is refused (greta.probe.preflight, before the run; here too).
prompt_info() describes the result for the record: source, token counts and a sha256 of the ids.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from greta.paths import record_name, resolve

HELLO = "hello "
TEXT_KEPT = 4000  # characters of the prompt text the record keeps (a prompt_file may be a book)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def find_tokenizer(model: str, tokenizer: str = "") -> Path | None:
    """The tokenizer for text prompts: the tokenizer param (a file, or a directory holding tokenizer.json),
    else tokenizer.json beside model, else model's own .gguf file (its tokenizer.ggml.* metadata)."""
    from greta.engine.source import model_path

    if tokenizer:
        p = resolve(tokenizer)
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


def find_chat_template(tok_path) -> tuple[str, dict] | None:
    """(chat template, the special token strings it may use) of the tokenizer at tok_path: a .gguf file's
    tokenizer.chat_template, or chat_template.jinja / tokenizer_config.json's chat_template beside a
    tokenizer.json (transformers' layouts); None when it has none."""
    p = Path(tok_path)
    if p.suffix == ".gguf":
        from greta.engine.gguf_tokenizer import chat_template, special_token_strings

        template = chat_template(p)
        return (template, special_token_strings(p)) if template else None
    config = _json_beside(p.parent / "tokenizer_config.json")
    jinja = p.parent / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers takes "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        return None
    specials = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items() if k in SPECIAL_TOKENS}
    return template, {k: v for k, v in specials.items() if isinstance(v, str)}


def _json_beside(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({' '.join(str(e).split())[:120]})") from None
    return data if isinstance(data, dict) else {}


DOCUMENT_MARK = "\x00document\x00"  # where the document goes in the rendered chat (no template writes NUL)


def chat_prompt(message: str, model: str, tokenizer: str, ctx: int, vocab: int,
                document: str = "", source: str = "") -> tuple[torch.Tensor, dict]:
    """The chat param's prompt (module docstring): ctx ids, and what the record says about them. One-line
    ValueError when it cannot be made."""
    from greta.engine.gguf_tokenizer import render_chat
    from greta.engine.passage import PASSAGE

    tok = find_tokenizer(model, tokenizer)
    if tok is None:
        raise ValueError(f"param chat needs the model's tokenizer and chat template, and model {model} has no tokenizer.json "
                         "beside it nor a .gguf tokenizer of its own; use a model that has them (e.g. -p model=smollm2)")
    found = find_chat_template(tok)
    if found is None:
        raise ValueError(f"param chat needs a chat template, and the tokenizer {tok} has none; give the text itself with "
                         "-p prompt_file=<text file>")
    messages = [{"role": "system", "content": DOCUMENT_MARK}, {"role": "user", "content": message}]
    text = render_chat(found[0], messages, **found[1])
    if text.count(DOCUMENT_MARK) != 1:
        raise ValueError(f"param chat: the chat template of {tok} does not show a system message once, so it cannot "
                         "carry the document; use -p prompt_file=<text file> without chat")
    t = load_tokenizer(tok)
    before, after = text.split(DOCUMENT_MARK)
    head, tail = t.encode(before).ids, t.encode(after, add_special_tokens=False).ids
    doc = t.encode((document or PASSAGE) + "\n\n", add_special_tokens=False).ids  # copies a paragraph apart
    room = ctx - len(head) - len(tail)
    if room < 0 or not doc:
        why = f"{len(head) + len(tail)} tokens, more than ctx={ctx}" if room < 0 else "no document tokens"
        raise ValueError(f"param chat renders to {why} with the model's chat template; raise -p ctx to "
                         f"{len(head) + len(tail)} or more, or shorten the message")
    arr = np.array(head + (doc * (room // len(doc) + 1))[:room] + tail, dtype=np.int64)
    if arr.max() >= vocab:
        raise ValueError(f"tokenizer {tok} gives id {int(arr.max())}, outside the model's vocab_size {vocab}")
    what = source or "greta.engine.passage.PASSAGE"
    info = {"prompt_source": "chat+template", "chat": message, "tokenizer": record_name(tok), "document": what,
            "text": before + f"[document: {room} tokens of {what}]" + after,
            "prompt_text_tokens": len(head) + len(tail),
            "prompt_fit": f"the chat's {len(head) + len(tail)} tokens around {room / len(doc):.2f} copies of the document"}
    return torch.from_numpy(arr), info


def make_prompt_from_params(p, vocab: int) -> tuple[torch.Tensor, dict]:
    """The probe's prompt ids [ctx] for a run's Params p (greta.record.params: model, tokenizer, ctx, seed, prompt,
    prompt_file, chat) and what the record says about them (source, the text as given, at most TEXT_KEPT
    characters of it, token counts, the ids' sha256)."""
    from greta.paths import resolve
    from greta.engine.prompt import make_prompt

    ctx, spec, text_file, chat = p.ctx, p.prompt, p.prompt_file, p.chat
    info: dict = {}
    if chat:
        doc = resolve(text_file).read_text(encoding="utf-8") if text_file else ""
        ids, info = chat_prompt(chat, p.model, p.tokenizer, ctx, vocab, doc, f"prompt_file {text_file}" if text_file else "")
    elif text_file or spec == "hello":
        tok = find_tokenizer(p.model, p.tokenizer)
        what = f"prompt_file {text_file}" if text_file else "'hello ' x ctx"
        if tok is None:  # preflight refuses this first; never substitute other ids for the text asked for
            raise ValueError(f"text prompt ({what}) needs a tokenizer, and model {p.model} has no tokenizer.json beside "
                             "it nor a .gguf tokenizer of its own; pass -p tokenizer=<dir with tokenizer.json>")
        text = resolve(text_file).read_text(encoding="utf-8") if text_file else HELLO * ctx
        ids, n_text = tokenize_to_ctx(text, tok, ctx, vocab)
        info = {"prompt_source": "text+tokenizer", "prompt_text": what, "text": text, "tokenizer": record_name(tok),
                "prompt_text_tokens": n_text,
                "prompt_fit": "truncated" if n_text > ctx else ("padded by repeating the text" if n_text < ctx else "exact")}
    else:
        ids = make_prompt(spec, ctx, vocab, p.seed)
        info = {"prompt_source": "synthetic"} if spec == "synthetic" else {"prompt_source": "token file", "prompt_file": spec}
    if "text" in info and len(info["text"]) > TEXT_KEPT:
        info.update(text=info["text"][:TEXT_KEPT], text_chars=len(info["text"]))
    info.update(prompt_tokens=int(ids.numel()), prompt_ids_sha256=ids_sha256(ids))
    return ids, info
