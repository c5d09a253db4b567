"""The oracle on real weights: Greta vs transformers on the same GGUF file (model=smollm2, or a .gguf path), fp32.

transformers reads the file itself (AutoModelForCausalLM / AutoTokenizer.from_pretrained(dir, gguf_file=...),
its own dequantization, q/k un-permutation and tokenizer; loading needs accelerate). Held:
  tokens  Greta's GGUF tokenizer (engine.gguf_tokenizer) gives the ids transformers' gives, for the text and
          for the chat prompt (the file's chat template; Greta renders it in jinja2's sandbox);
  logits  over PASSAGE (>= 256 tokens of plain English), teacher-forced: Greta's prefill path at every position
          and its decode path (prefill, then one-token steps) at the last `steps`, against transformers' one
          forward pass: rel = max |Δlogit| / max |logit| <= 1e-4 (oracle.TOLERANCES: the same function in fp32,
          only the summation order and Greta's fp64 RoPE angles differ) and top-1 agreement 1.0 at every position;
  greedy  the chat prompt's greedy continuation, `gen` tokens (EOS does not stop either side), Greta's runner
          (prefill, then decode steps) vs transformers' own decode loop over its KV cache: the same ids.
Negative control: Greta with rope_theta x 1.01 (oracle.wrong_rope) against the same logits must fail.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from greta.checks.oracle import OracleMissing, TOLERANCES, _log, _transformers, agreement, greta_logits, wrong_rope
from greta.engine.passage import PASSAGE

# Greta's tile: at kv_aligned=1 each decode step runs a whole prefill tile (its rows pad to it, so decode and
# prefill round alike), so a small tile keeps the 32-step greedy continuation cheap on the CPU.
CHUNK = KV_BLOCK = 16
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _gguf_path(model: str) -> Path:
    from greta.engine.source import model_path, model_source

    if model_source(model) != "gguf":
        raise ValueError(f"model={model!r}: the GGUF oracle needs a .gguf file or a real model's name (smollm2)")
    return Path(model_path(model))


def hf_gguf(path: Path):
    """(transformers' model in fp32, its tokenizer), both read from the GGUF file."""
    import importlib.util

    tf = _transformers()
    if importlib.util.find_spec("accelerate") is None:  # transformers imports it to load a GGUF file
        raise OracleMissing("transformers needs accelerate to load a GGUF file: pip install greta[test]")
    kw = {"gguf_file": path.name}
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw).eval()
    return model, tf.AutoTokenizer.from_pretrained(str(path.parent), **kw)


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """transformers' greedy continuation: one forward over the prompt, then n - 1 one-token steps on its cache
    (an argument named `cache` since transformers 5.x, `past_key_values` before)."""
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with torch.inference_mode():
        res = model(input_ids=ids[None], use_cache=True)
        for _ in range(n):
            out.append(int(res.logits[0, -1].argmax()))
            if len(out) < n:
                res = model(input_ids=torch.tensor([out[-1:]]), use_cache=True, **{key: getattr(res, key)})
    return out


def greta_greedy(cfg, w: dict, ids: torch.Tensor, n: int, kv_aligned: int = 1) -> list[int]:
    """Greta's greedy continuation: chunked prefill of the prompt, then n - 1 decode steps."""
    from greta.engine.runner import Runner

    r = Runner(cfg, w, max_tokens=ids.numel() + n, kv_aligned=kv_aligned, chunk=CHUNK, kv_block=KV_BLOCK, backend="torch")
    logits, out = r.prefill(ids)[-1], []
    for i in range(n):
        out.append(int(logits.argmax()))
        if i + 1 < n:
            logits = r.decode(torch.tensor(out[-1]), ids.numel() + i)
    return out


def _within(r: dict) -> bool:
    return r["rel"] <= TOLERANCES["float32"]["rel"] and r["top1_agreement"] == 1.0


def _paths(cfg, w, tokens, want, steps, kv_aligned) -> dict:
    pre, dec = greta_logits(cfg, w, tokens, steps, kv_aligned=kv_aligned, chunk=CHUNK, kv_block=KV_BLOCK)
    tol = TOLERANCES["float32"]["rel"]
    out = {"prefill": agreement(pre, want, tol), "decode": agreement(dec, want[-steps:], tol)}
    out["ok"] = _within(out["prefill"]) and _within(out["decode"])
    return out


def _control(cfg, w, tokens, want, kv_aligned) -> dict:
    """The wrong-RoPE run, prefill path only (what it must fail is the same comparison)."""
    from greta.engine.runner import Runner

    wrong, what = wrong_rope(cfg)
    r = Runner(wrong, w, max_tokens=tokens.numel(), kv_aligned=kv_aligned, chunk=CHUNK, kv_block=KV_BLOCK, backend="torch")
    pre = agreement(r.prefill(tokens, keep=list(range(tokens.numel()))), want, TOLERANCES["float32"]["rel"])
    return {"change": what, "prefill": pre, "ok": _within(pre)}


def _tokens(path: Path, hf_tok) -> dict:
    """Both tokenizers' ids for PASSAGE and the chat prompt (Greta's rendering of the file's template)."""
    from greta.engine.gguf_tokenizer import chat_template, gguf_tokenizer, render_chat, special_token_strings

    ours = gguf_tokenizer(path)
    chat = render_chat(chat_template(path), CHAT, **special_token_strings(path))
    texts = {"passage": PASSAGE, "chat": chat}
    res = {k: {"greta": ours.encode(t).ids, "transformers": hf_tok(t).input_ids} for k, t in texts.items()}
    res["chat_text"] = chat
    res["chat_text_transformers"] = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    res["same"] = all(res[k]["greta"] == res[k]["transformers"] for k in texts) and chat == res["chat_text_transformers"]
    res["decode"] = lambda ids: ours.decode(ids, skip_special_tokens=False)
    return res


def compare_gguf(model: str = "smollm2", *, gen: int = 32, steps: int = 8, kv_aligned: int = 1, control: bool = True,
                 quiet: bool = True) -> dict:
    """Greta vs transformers on a GGUF file, fp32 on the CPU (tokens, logits, greedy continuation; see above)."""
    from greta.engine.source import load_model

    path, seconds = _gguf_path(model), {}
    t0 = time.perf_counter()
    _log(f"transformers loads {path.name}", quiet)
    hf_model, hf_tok = hf_gguf(path)
    seconds["transformers_load"] = time.perf_counter() - t0
    toks = _tokens(path, hf_tok)
    tokens = torch.tensor(toks["passage"]["greta"])
    _log(f"transformers forward over {tokens.numel()} tokens", quiet)
    with torch.inference_mode():
        want = hf_model(input_ids=tokens[None], use_cache=False).logits[0].float()
    chat_ids = torch.tensor(toks["chat"]["greta"])
    hf_cont = hf_greedy(hf_model, chat_ids, gen)
    seconds["transformers"] = time.perf_counter() - t0 - seconds["transformers_load"]
    del hf_model
    t0 = time.perf_counter()
    m = load_model(model, 0, torch.float32, "cpu")
    _log("Greta prefill and decode paths, greedy continuation", quiet)
    res = {"model": model, "file": str(path), "positions": tokens.numel(), "steps": steps, "gen": gen, "kv_aligned": kv_aligned,
           "tolerance": {"rel": TOLERANCES["float32"]["rel"], "top1": 1.0}, "tokens_same": toks["same"],
           "chat_text": toks["chat_text"], "chat_tokens": len(toks["chat"]["greta"]),
           **_paths(m.config, m.weights, tokens, want, steps, kv_aligned)}
    ours = greta_greedy(m.config, m.weights, chat_ids, gen, kv_aligned)
    res["greedy"] = {"greta": ours, "transformers": hf_cont, "same": ours == hf_cont,
                     "greta_text": toks["decode"](ours), "transformers_text": toks["decode"](hf_cont)}
    res["ok"] = res["ok"] and toks["same"] and ours == hf_cont and tokens.numel() >= 256
    seconds["greta"] = time.perf_counter() - t0
    if control:
        _log("negative control: Greta with a wrong RoPE", quiet)
        res["control"] = _control(m.config, m.weights, tokens, want, kv_aligned)
    res["seconds"] = seconds
    return res


def verdict(res: dict) -> str:
    if not res["ok"]:
        return "FAIL_ORACLE"
    return "FAIL_CONTROL" if res.get("control", {}).get("ok") else "PASS_ORACLE"


def format_result(res: dict) -> str:
    """Terminal lines; the texts from the model are shown through repr (escaped: no control characters)."""
    t = res["tolerance"]
    lines = [f"oracle: Greta (kv_aligned {res['kv_aligned']}) vs transformers on the GGUF file {res['file']} (model {res['model']}), fp32, CPU "
             f"(limit rel <= {t['rel']:g}, top-1 agreement {t['top1']:g})",
             f"  tokens: {'the same' if res['tokens_same'] else 'DIFFERENT'} ids from both tokenizers "
             f"(passage {res['positions']} tokens, chat prompt {res['chat_tokens']})"]
    for label, r0 in [("Greta", res)] + ([(f"control ({res['control']['change']})", res["control"])] if "control" in res else []):
        for p in ("prefill", "decode")[:1 + (r0 is res)]:
            r = r0[p]
            lines.append(f"  {label:>28s} {p:8s} max_abs_diff {r['max_abs_diff']:.3g}  rel {r['rel']:.3g}  "
                         f"top1_agreement {r['top1_agreement']:.4f}  ({r['positions']} positions)")
    g = res["greedy"]
    lines.append(f"  greedy {res['gen']} tokens: {'the same' if g['same'] else 'DIFFERENT'}; Greta: {g['greta_text']!r}")
    if not g["same"]:
        lines.append(f"  transformers: {g['transformers_text']!r}")
    lines.append({"PASS_ORACLE": "OK" + (" (the control fails, as it must)" if "control" in res else ""),
                  "FAIL_ORACLE": "FAIL: outside tolerance, or tokens or continuation differ",
                  "FAIL_CONTROL": "FAIL: the wrong-RoPE control passed too, so this comparison cannot tell"}[verdict(res)])
    return "\n".join(lines)
