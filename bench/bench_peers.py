"""The peers of bench_b3_77.py, each run through `attempt` so that a failure (a missing package, an API
that is not there, OOM) is recorded as one line and the bench goes on.

  hf-eager    HF transformers LlamaForCausalLM (sdpa, DynamicCache), a python loop of forward calls
  hf-static   HF `generate` with past_key_values=StaticCache(config=..., max_cache_len=...), which compiles
              its own decode step; prefill = generate(max_new_tokens=1), decode = the rest of
              generate(max_new_tokens=1 + gen) per token, the cache reset between runs
  attention   causal attention alone (32 q / 8 kv heads, d 128, bf16): torch SDPA's cuDNN (GQA, and with
              K/V expanded to 32 heads in case cuDNN takes no GQA here) and flash backends, Greta's exact
              prefill kernel and kv0's prefill attention; TFLOP/s over visible pairs
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

PEERS = ("hf-eager", "hf-static", "attention")


def free():
    gc.collect()
    torch.cuda.empty_cache()


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def attempt(name: str, failures: list, fn, *args, **kwargs):
    """fn(*args, **kwargs), or None with {"peer": name, "error": one line} appended to failures."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure of a peer is a result, and the bench goes on
        failures.append({"peer": name, "error": one_line(e)})
        print(f"{name}: FAILED {one_line(e)}", flush=True)
        free()
        return None


def sync():
    torch.cuda.synchronize()


def hf_model(cfg):
    """A random-init HF Llama of the config's shape, bf16, SDPA attention, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")},
                         torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()


def time_hf_eager(model, prompt, gen):
    """(prefill_s warm, decode ms/token median, peak GiB, decode-vs-prefill max |Δlogit| over 8 steps)."""
    ids = prompt[None]
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model(ids, use_cache=True, logits_to_keep=1)  # warm, as Greta's points: the timed prefill is the second
        free()
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync()
        prefill_s = time.perf_counter() - t0
        cache, tok = out.past_key_values, out.logits[0, -1].argmax()
        steps, toks, dec_logits = [], [int(tok)], []
        for _ in range(gen):
            sync()
            t0 = time.perf_counter()
            out = model(tok.view(1, 1), past_key_values=cache, use_cache=True)
            sync()
            steps.append(time.perf_counter() - t0)
            dec_logits.append(out.logits[0, -1].float())
            tok = out.logits[0, -1].argmax()
            toks.append(int(tok))
        peak = torch.cuda.max_memory_allocated() / 2**30
        span = min(8, gen)  # teacher-forced: decode step j was fed toks[j]
        seq = torch.cat([prompt, torch.tensor(toks[:span], device=prompt.device)])[None]
        ref = model(seq, use_cache=False, logits_to_keep=span).logits[0].float()
        drift = float((torch.stack(dec_logits[:span]) - ref).abs().max())
    del cache, out
    free()
    return prefill_s, 1e3 * statistics.median(steps[1:]), peak, drift


def _generate_s(model, ids, cache, new: int) -> float:
    cache.reset()
    sync()
    t0 = time.perf_counter()
    model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   pad_token_id=0)
    sync()
    return time.perf_counter() - t0


def time_hf_static(model, prompt, gen, reps: int = 2):
    """HF generate over a StaticCache (transformers >= 4.56: StaticCache(config=, max_cache_len=)); its decode
    step compiles on first use, so a warm-up generate on a short prompt with the same cache comes first.
    (prefill_s, decode ms/token, peak GiB): the best of reps of generate(1) and of generate(1 + gen)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.numel() + gen + 8)
    with torch.inference_mode():
        _generate_s(model, prompt[None, :64], cache, gen + 1)  # compile the decode step for this cache
        torch.cuda.reset_peak_memory_stats()
        one = min(_generate_s(model, prompt[None], cache, 1) for _ in range(reps))
        many = min(_generate_s(model, prompt[None], cache, gen + 1) for _ in range(reps))
        peak = torch.cuda.max_memory_allocated() / 2**30
    del cache
    free()
    return one, 1e3 * (many - one) / gen, peak


def _ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=3, rep=20, return_mode="median")


def _sdpa_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def attention_rows(cfg, ctxs, chunk, failures):
    """Causal prefill attention alone at each ctx: the whole sequence (start 0) by every kernel, and the
    last `chunk` rows (start ctx - chunk) by the chunked ones. TFLOP/s = 4·H·D·(visible pairs) / time."""
    rows = []
    for ctx in ctxs:
        _attention_at(cfg, ctx, chunk, failures, rows)
        free()
    return rows


def _attention_at(cfg, ctx, chunk, failures, rows):
    from torch.nn.attention import SDPBackend

    from greta.engine.ops.sdpa import Attention
    from greta.kernels import prefill_attention

    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = torch.Generator(device="cuda").manual_seed(ctx)
    q = torch.randn(ctx, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kc, vc = (torch.randn(Hkv, ctx, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    qb, kb, vb = q.transpose(0, 1)[None], kc[None], vc[None]
    kv0 = Attention()
    ke, ve = (x.repeat_interleave(H // Hkv, dim=1) for x in (kb, vb))  # K/V copied to every query head
    kernels = {  # name -> (run from query row s, runs a chunk from s > 0)
        "sdpa-cudnn": (lambda s: _sdpa_backend(SDPBackend.CUDNN_ATTENTION)(qb, kb, vb), False),
        "sdpa-cudnn (K/V expanded to 32 heads)": (lambda s: _sdpa_backend(SDPBackend.CUDNN_ATTENTION)(qb, ke, ve), False),
        "sdpa-flash": (lambda s: _sdpa_backend(SDPBackend.FLASH_ATTENTION)(qb, kb, vb), False),
        "greta-exact (kv1)": (lambda s: prefill_attention(q[s:], kc, vc, s), True),
        "greta-kv0": (lambda s: kv0(qb[:, :, s:], kb, vb, s), True),
    }
    for name, (fn, chunked) in kernels.items():
        for start in ([0, ctx - chunk] if chunked else [0]):
            pairs = sum(range(start + 1, ctx + 1))
            ms = attempt(f"attention {name} ctx {ctx} start {start}", failures, _ms, lambda: fn(start))
            if ms is not None:
                rows.append({"kernel": name, "ctx": ctx, "start": start, "rows": ctx - start, "ms": ms,
                             "tflops": 4 * H * D * pairs / ms / 1e9})
                if name == "greta-kv0":  # which backends ran, and how far from the exact kernel (bf16 drift)
                    exact = prefill_attention(q[start:], kc, vc, start)
                    rows[-1].update(backends=dict(kv0.backends), notes=list(kv0.notes), max_abs_vs_exact=float(
                        (fn(start)[0].transpose(0, 1).float() - exact.float()).abs().max()))
                print(rows[-1], flush=True)
