"""report.md's "Text" section: the prompt as text (a chat message and its rendering by the model's template,
or a text prompt) and what each path generated, decoded (metadata.json's prompt and continuation:
greta.engine.tokenize, greta.probe.continuation). Every piece of text comes from outside (the user, the
model) and goes through greta.reports.md: each line of it is escaped, shown as a quoted block."""
from __future__ import annotations

from greta.reports import md
from greta.reports.md import Markup

MAX_LINES = 40  # lines of one text shown; a prompt_file may be long, its first TEXT_KEPT characters are kept


def quoted(text: str) -> list[Markup]:
    """text as a Markdown block quote, one escaped line per line (a hard break after each), at most MAX_LINES."""
    lines = str(text).split("\n")
    shown = [Markup("> " + md.text(ln) + "  ") if ln else Markup(">") for ln in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES:
        shown.append(Markup(f"> {md.CUT_MARK} {len(lines) - MAX_LINES:,} more lines"))
    return shown + [Markup("")]


def text_section(meta: dict) -> list[str]:
    """The section's lines; none for a run whose prompt has no text and whose model has no tokenizer."""
    prompt, cont = meta.get("prompt") or {}, meta.get("continuation")
    if "text" not in prompt and not cont:
        return []
    return ["## Text", "", *_prompt_lines(prompt), *_continuation_lines(cont)]


def _prompt_lines(prompt: dict) -> list[str]:
    if "text" not in prompt:
        return [md.line("Prompt: ", prompt.get("prompt_source") or "?", " token ids (no text).", sep=""), ""]
    counts = md.text(f"{prompt.get('prompt_text_tokens')} tokens, {prompt.get('prompt_tokens')} in the prompt: "
                     f"{prompt.get('prompt_fit')}")
    cut = (md.text(f" (its first {len(prompt['text']):,} of {prompt['text_chars']:,} characters)")
           if prompt.get("text_chars") else "")
    if "chat" in prompt:
        return [md.line("Prompt: the chat message", sep=""), "", *quoted(prompt["chat"]),
                md.line("rendered with the model's chat template (", counts, ")", cut, ":", sep=""), "",
                *quoted(prompt["text"])]
    return [md.line("Prompt text (", prompt.get("prompt_text") or prompt.get("prompt_source"), "; ", counts, ")", cut,
                    ":", sep=""), "", *quoted(prompt["text"])]


def _continuation_lines(cont: dict | None) -> list[str]:
    if not cont:
        return []
    if "error" in cont:
        return [md.line("The generated tokens are not decoded: ", cont["error"], sep=""), ""]
    dec, pre, span = cont["decode"], cont["prefill"], cont["span"]
    L = [md.text(f"Decode path, greedy ({len(dec['tokens'])} tokens: the prefill's first token, then one-token "
                 "steps from the KV cache):"), "", *quoted(dec["text"]),
         md.text(f"Prefill path, its own top-1 at each of the span's {span} positions (the teacher-forced "
                 "reference pass, fed the decode path's tokens before each):"), "", *quoted(pre["text"])]
    first = cont.get("first_difference")
    if first is None:
        return L + [md.text(f"Over the span both paths choose the same {span} tokens."), ""]
    top = cont.get("top5_at_first_difference") or {}
    rows = [[i + 1, md.code(repr(d["token"])), f"{d['logit']:.4f}", md.code(repr(p["token"])), f"{p['logit']:.4f}"]
            for i, (d, p) in enumerate(zip(top.get("decode", []), top.get("prefill", [])))]
    return L + [md.text(f"The paths first choose differently at step {first} of the span; each path's top-5 there:"), "",
                md.table(["Rank", "Decode token", "Decode logit", "Prefill token", "Prefill logit"], rows), ""]
