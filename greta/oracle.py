"""An independent oracle: Greta's logits against HF transformers' LlamaForCausalLM on the same checkpoint.

Self-consistency (decode equals prefill) cannot catch a mistake both paths share, e.g. a wrong RoPE
scaling. Here transformers computes the same prompt in one forward pass (eager attention, no cache), and
both of Greta's paths are held against it:
  prefill  Greta's chunked prefill, logits at every prompt position;
  decode   Greta's prefill of the first ctx - steps tokens, then `steps` one-token decode steps fed the
           rest of the prompt (teacher-forced), logits at those positions.
Measured: max |Δlogit|, that divided by max |oracle logit| (rel), and top-1 agreement.

transformers is a test/oracle dependency, not a runtime one: it is imported here only.
"""
from __future__ import annotations

import torch

from .config import ModelConfig, load_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# rel = max |Δlogit| / max |oracle logit|, over all compared positions.
# fp32: both sides compute the same function in fp32; only summation order and Greta's fp64 RoPE angles
# differ, so they agree to ~1e-6 (the issue asks for about 1e-4).
# bf16: each side rounds every activation to bf16 at different points (HF applies RoPE in bf16, Greta in
# fp32; SDPA vs eager softmax), so differences are bf16 noise, ~1.5% of the logit range measured; top-1 may
# flip only where the top two logits are within that noise.
# top1 is held on the decisive positions: those whose oracle top-1 leads its runner-up by more than twice the
# tolerance in logits (2 * rel * max |oracle logit|); a flip there means an error beyond the tolerance.
# Plain top-1 agreement over all positions is reported beside it (random small models have flat logits, so
# bf16 near-ties flip often).
TOLERANCES = {
    "float32": {"rel": 1e-4, "top1": 1.0},
    "bfloat16": {"rel": 4e-2, "top1": 1.0},
}


class OracleMissing(RuntimeError):
    pass


def _transformers():
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise OracleMissing("the oracle needs transformers, which is not installed: pip install greta[test]") from None
    return LlamaForCausalLM


def hf_logits(model: str, tokens: torch.Tensor, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """transformers' logits [T, V] (fp32) for one forward pass over tokens, no cache, eager attention."""
    LlamaForCausalLM = _transformers()
    m = LlamaForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="eager").to(device).eval()
    with torch.inference_mode():
        out = m(input_ids=tokens[None].to(device), use_cache=False).logits[0].float().cpu()
    del m
    return out


def greta_logits(cfg: ModelConfig, w: dict, tokens: torch.Tensor, steps: int, *, kv_aligned: int = 1,
                 chunk: int = 64, kv_block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits [T, V] at every position, decode logits [steps, V] at the last `steps` positions)."""
    T = tokens.numel()
    dev = w["embed"].device
    tokens = tokens.to(dev)
    kw = dict(max_tokens=T, kv_aligned=kv_aligned, chunk=chunk, kv_block=kv_block)
    from .model import Llama

    pre = Llama(cfg, w, **kw).prefill(tokens, keep=list(range(T))).cpu()
    m = Llama(cfg, w, **kw)
    m.prefill(tokens[: T - steps])
    dec = torch.stack([m.decode(tokens[p], p) for p in range(T - steps, T)]).cpu()
    return pre, dec


def agreement(got: torch.Tensor, want: torch.Tensor, rel_tol: float = 0.0) -> dict:
    """max |Δ|, rel, top-1 agreement over all positions and over the decisive ones (oracle margin between
    its top two logits > 2 * rel_tol * max |oracle logit|)."""
    d = (got.double() - want.double()).abs()
    scale = float(want.double().abs().max())
    same = got.argmax(-1) == want.argmax(-1)
    top2 = want.double().topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * rel_tol * scale
    n_dec = int(decisive.sum())
    return {"max_abs_diff": float(d.max()), "rel": float(d.max()) / scale if scale else float("inf"),
            "top1_agreement": float(same.double().mean()),
            "top1_agreement_decisive": float(same[decisive].double().mean()) if n_dec else 1.0,
            "decisive_positions": n_dec, "oracle_max_abs_logit": scale, "positions": int(got.shape[0])}


def compare(model: str, ctx: int = 128, dtype: str = "float32", device: str = "cpu", *, seed: int = 0,
            steps: int = 8, kv_aligned: int = 1, chunk: int = 64, kv_block: int = 64,
            cfg: ModelConfig | None = None, oracle: torch.Tensor | None = None) -> dict:
    """Greta vs transformers on checkpoint directory `model`. cfg overrides the config Greta runs with (the
    tests' negative controls); oracle reuses transformers' logits from an earlier call."""
    from .prompt import synthetic_prompt
    from .weights import load_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"oracle dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    true_cfg = load_config(model)
    cfg = cfg or true_cfg
    if not 1 <= steps < ctx:
        raise ValueError(f"oracle needs 1 <= steps < ctx (steps={steps}, ctx={ctx})")
    tokens = synthetic_prompt(ctx, cfg.vocab_size, seed)
    if oracle is None:
        oracle = hf_logits(model, tokens, DTYPES[dtype], device)
    w = load_checkpoint(model, true_cfg, DTYPES[dtype], device)
    pre, dec = greta_logits(cfg, w, tokens, steps, kv_aligned=kv_aligned, chunk=chunk, kv_block=kv_block)
    tol = TOLERANCES[dtype]
    res = {"model": str(model), "ctx": ctx, "dtype": dtype, "steps": steps, "kv_aligned": kv_aligned,
           "tolerance": dict(tol), "prefill": agreement(pre, oracle, tol["rel"]),
           "decode": agreement(dec, oracle[ctx - steps:], tol["rel"])}
    res["ok"] = all(res[p]["rel"] <= tol["rel"] and res[p]["top1_agreement_decisive"] >= tol["top1"]
                    for p in ("prefill", "decode"))
    res["oracle_logits"] = oracle
    return res


def format_result(res: dict) -> str:
    t = res["tolerance"]
    lines = [f"oracle: Greta vs transformers LlamaForCausalLM, {res['model']}, ctx {res['ctx']}, {res['dtype']}, "
             f"kv_aligned {res['kv_aligned']} (tolerance: rel <= {t['rel']:g}, top-1 on decisive positions >= {t['top1']:g})"]
    for p in ("prefill", "decode"):
        r = res[p]
        lines.append(f"  {p:8s} max_abs_diff {r['max_abs_diff']:.3g}  rel {r['rel']:.3g}  "
                     f"top1_agreement {r['top1_agreement']:.4f} (decisive {r['top1_agreement_decisive']:.4f} "
                     f"of {r['decisive_positions']})  ({r['positions']} positions)")
    lines.append("OK" if res["ok"] else "FAIL: outside tolerance")
    return "\n".join(lines)
