"""A GGUF file's own tokenizer and chat template: `tokenizer.ggml.*` metadata -> a `tokenizers` Tokenizer.

Two vocabularies (tokenizer.ggml.model):
  gpt2   byte-level BPE with the file's merges (SmolLM2, Llama-3). Tokens are spelled in GPT-2's byte alphabet
         (a token with other characters is respelled from its UTF-8 bytes). The text is split before BPE as
         llama.cpp splits it for the file's tokenizer.ggml.pre (PRE_TOKENIZERS); an unknown one is refused
         rather than guessed.
  llama  SentencePiece-style: BPE whose merges are derived from the pieces' scores (best first, as
         transformers' generate_merges orders them), byte fallback to the <0xXX> pieces, '▁' for a space and
         one prepended to the text unless tokenizer.ggml.add_space_prefix is false.
Control tokens (token_type 3; for byte-level vocabularies only those spelled in the byte alphabet), and the
bos/eos/unknown/padding tokens, are special: matched whole in the text, never split. User-defined ones
(token_type 4) are matched whole too. BOS (EOS) is added when tokenizer.ggml.add_bos_token (add_eos_token)
says so; a `llama` vocabulary that does not say adds BOS, as llama.cpp does.
The result encodes as transformers' GGUF tokenizer does (tests/test_gguf_tokenizer.py holds the two together).

tokenizer.chat_template is rendered with jinja2's ImmutableSandboxedEnvironment (a template from a file
cannot reach Python), with the options transformers' apply_chat_template uses.
"""
from __future__ import annotations

from greta.engine.gguf import GGUFError, gguf_field, gguf_reader

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split each digit first, the regex; None: GPT-2's, inside ByteLevel) as llama.cpp's
# llama-vocab.cpp has them
PRE_TOKENIZERS = {
    "default": (False, None), "gpt2": (False, None), "gpt-2": (False, None),
    "smollm": (True, None), "starcoder": (True, None), "refact": (True, None),
    "llama3": (False, _LLAMA3_SPLIT), "llama-v3": (False, _LLAMA3_SPLIT), "llama-bpe": (False, _LLAMA3_SPLIT),
}


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise GGUFError("a GGUF file's tokenizer needs the tokenizers package: pip install greta[models]") from None
    return tokenizers


def _metadata(path) -> dict:
    r = gguf_reader(path)
    keys = ("model", "pre", "tokens", "token_type", "merges", "scores", "add_bos_token", "add_eos_token",
            "add_space_prefix", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
    meta = {k: gguf_field(r, "tokenizer.ggml." + k) for k in keys}
    meta["chat_template"] = gguf_field(r, "tokenizer.chat_template")
    if meta["model"] is None or meta["tokens"] is None:
        raise GGUFError(f"GGUF file {path} holds no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens): "
                        "pass -p tokenizer=<tokenizer.json>")
    return meta


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: each byte as a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = chr(256 + extra), extra + 1
    return out


def _byte_level(meta: dict, path):
    tk = _tokenizers()
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    if meta["pre"] not in PRE_TOKENIZERS:
        raise GGUFError(f"GGUF file {path}: tokenizer.ggml.pre {meta['pre']!r} is not one Greta splits text for "
                        f"(it knows {', '.join(PRE_TOKENIZERS)}); pass -p tokenizer=<tokenizer.json>")
    if meta["merges"] is None:
        raise GGUFError(f"GGUF file {path}: a gpt2 tokenizer without tokenizer.ggml.merges")
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = tk.Tokenizer(tk.models.BPE(vocab, merges, fuse_unk=False))
    digits, split = PRE_TOKENIZERS[meta["pre"]]
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    steps = ([tk.pre_tokenizers.Digits(individual_digits=True)] if digits else []) + (
        [tk.pre_tokenizers.Split(tk.Regex(split), behavior="isolated")] if split else []) + [byte_level]
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(steps)
    tok.decoder = tk.decoders.ByteLevel()
    return tok, (lambda t: set(t) <= alphabet)


def generate_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece pieces -> BPE merges: every split of a piece into two pieces, best piece score first
    (ties: shorter left, then shorter right part; within a piece, by the parts' ids), as transformers'
    tokenization_utils_base.generate_merges orders them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece(meta: dict, path):
    tk = _tokenizers()
    if meta["scores"] is None:
        raise GGUFError(f"GGUF file {path}: a llama (SentencePiece) tokenizer without tokenizer.ggml.scores")
    tokens = list(meta["tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]] if meta["merges"] else generate_merges(tokens, meta["scores"])
    tok = tk.Tokenizer(tk.models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prefix = meta["add_space_prefix"] is not False
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                    split=False)
    steps = [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    tok.decoder = tk.decoders.Sequence(steps + ([tk.decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, (lambda t: True)


def _add_specials(tok, meta: dict, spelled) -> None:
    tk = _tokenizers()
    tokens, types = meta["tokens"], meta["token_type"] or [1] * len(meta["tokens"])
    named = {meta[k] for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")} - {None}
    special = [i for i, ty in enumerate(types) if (ty == CONTROL and spelled(tokens[i])) or i in named]
    tok.add_special_tokens([tk.AddedToken(tokens[i], normalized=False, special=True) for i in special])
    user = [tokens[i] for i, ty in enumerate(types) if ty == USER_DEFINED and i not in named]
    if user:
        tok.add_tokens([tk.AddedToken(t, normalized=False, special=False) for t in user])


def _post_processor(tok, meta: dict) -> None:
    tk = _tokenizers()
    add_bos = meta["add_bos_token"] if meta["add_bos_token"] is not None else meta["model"] == "llama"
    ends = [(meta["bos_token_id"], bool(add_bos)), (meta["eos_token_id"], bool(meta["add_eos_token"]))]
    bos, eos = [meta["tokens"][i] if add and i is not None else None for i, add in ends]
    single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
    specials = [(t, meta["tokens"].index(t)) for t in (bos, eos) if t]
    tok.post_processor = tk.processors.TemplateProcessing(single=single, special_tokens=specials)


def gguf_tokenizer(path):
    """The GGUF file's tokenizer as a tokenizers.Tokenizer (one-line GGUFError when it has none Greta can build)."""
    meta = _metadata(path)
    builders = {"gpt2": _byte_level, "llama": _sentencepiece}
    if meta["model"] not in builders:
        raise GGUFError(f"GGUF file {path}: tokenizer.ggml.model {meta['model']!r} is not one Greta builds (it knows "
                        f"{', '.join(builders)}); pass -p tokenizer=<tokenizer.json>")
    tok, spelled = builders[meta["model"]](meta, path)
    _add_specials(tok, meta, spelled)
    _post_processor(tok, meta)
    return tok


def chat_template(path) -> str | None:
    """The file's tokenizer.chat_template (None when it has none)."""
    return gguf_field(gguf_reader(path), "tokenizer.chat_template")


def special_token_strings(path) -> dict[str, str]:
    """bos_token, eos_token, unk_token, pad_token as the chat template sees them (those the file names)."""
    meta = _metadata(path)
    ids = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}
    return {k: meta["tokens"][meta[v]] for k, v in ids.items() if meta[v] is not None}


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **tokens) -> str:
    """A chat rendered by its template in jinja2's immutable sandbox (transformers' options: trim_blocks,
    lstrip_blocks, loop controls, raise_exception, a tojson that keeps non-ASCII)."""
    import json

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refused these messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template cannot be rendered ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
