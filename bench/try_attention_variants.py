"""Exact prefill attention variants (GPU), Llama-3-8B shapes, each in its own process (GRETA_ATTN_VARIANT picks
the kernel's switches at import), with SDPA cuDNN / flash and Greta's kv0 attention timed in the same run.

Per variant: prefill rows == decode rows (bit for bit) at several positions of the last chunk at 32k and 128k,
the last 2048-row chunk's time at 32k and 128k, the whole 32k prefill as the engine runs it (16 chunks of 2048),
and decode attention at 4k / 32k / 128k. TFLOP/s = 4·H·D·(visible pairs) / time.

    python bench/try_attention_variants.py --out DIR base fma fma_spill ...
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

H, HKV, D, CHUNK = 32, 8, 128, 2048
CTXS = (32768, 131072)


def _ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=40, return_mode="median")


def _tflops(start, end, ms):
    pairs = (end * (end + 1) - start * (start + 1)) / 2
    return 4 * H * D * pairs / ms / 1e9


def _data(ctx):
    g = torch.Generator(device="cuda").manual_seed(ctx)
    kc, vc = (torch.randn(HKV, ctx, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    q = torch.randn(ctx, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, kc, vc


def one_variant():
    from greta.kernels import attention as A

    out = {"variant": os.environ.get("GRETA_ATTN_VARIANT", ""), "BLOCK_KV": A.BLOCK_KV, "SPLIT_KV": A.SPLIT_KV,
           "PREFILL": list(A.PREFILL)}
    for ctx in CTXS:
        q, kc, vc = _data(ctx)
        s = ctx - CHUNK
        o = A.prefill_attention(q[s:], kc, vc, s)
        rows = [0, 1, 63, 64, 127, 777, 1024, CHUNK - 1]
        dec = torch.cat([A.decode_attention(q[s + t:s + t + 1], kc, vc, s + t) for t in rows])
        out[f"exact_{ctx}"] = bool(torch.equal(o[rows].view(torch.int16), dec.view(torch.int16)))
        ms = _ms(lambda: A.prefill_attention(q[s:], kc, vc, s))
        out[f"chunk_ms_{ctx}"], out[f"chunk_tflops_{ctx}"] = ms, _tflops(s, ctx, ms)
        out[f"decode_ms_{ctx}"] = _ms(lambda: A.decode_attention(q[-1:], kc, vc, ctx - 1))
        if ctx == 32768:
            out["decode_ms_4096"] = _ms(lambda: A.decode_attention(q[4095:4096], kc, vc, 4095))
            whole = sum(_ms(lambda c=c: A.prefill_attention(q[c:c + CHUNK], kc, vc, c)) for c in range(0, ctx, CHUNK))
            out["whole_ms_32768"], out["whole_tflops_32768"] = whole, _tflops(0, ctx, whole)
        del q, kc, vc
        torch.cuda.empty_cache()
    print("RESULT " + json.dumps(out), flush=True)


def peers():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from greta.engine.ops.sdpa import Attention

    rows = []
    for ctx in CTXS:
        q, kc, vc = _data(ctx)
        qb, kb, vb = q.transpose(0, 1)[None], kc[None], vc[None]
        for name, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            def run(be=be):
                with sdpa_kernel([be]):
                    return torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
            ms = _ms(run)
            rows.append({"kernel": name, "ctx": ctx, "start": 0, "ms": ms, "tflops": _tflops(0, ctx, ms)})
        kv0 = Attention()
        s = ctx - CHUNK
        ms = _ms(lambda: kv0(qb[:, :, s:], kb, vb, s))
        rows.append({"kernel": "greta-kv0 (cuDNN prefix + diagonal)", "ctx": ctx, "start": s, "ms": ms,
                     "tflops": _tflops(s, ctx, ms), "backends": dict(kv0.backends)})
        print(rows[-1], flush=True)
        del q, kc, vc, qb, kb, vb
        torch.cuda.empty_cache()
    return rows


def main(argv):
    out_dir = argv[argv.index("--out") + 1]
    variants = [a for a in argv if not a.startswith("--") and a != out_dir]
    os.makedirs(out_dir, exist_ok=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "peers": peers(), "variants": []}
    for v in variants:
        env = {**os.environ, "GRETA_ATTN_VARIANT": "" if v == "base" else v}
        try:
            p = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, timeout=150)
            res = [json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            doc["variants"].append(res[0] if res else {"variant": v, "error": (p.stderr or p.stdout)[-600:]})
        except subprocess.TimeoutExpired:
            doc["variants"].append({"variant": v, "error": "timeout 150 s"})
        print(json.dumps(doc["variants"][-1]), flush=True)
        with open(os.path.join(out_dir, "attention_variants.json"), "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    if "--one" in sys.argv:
        one_variant()
    else:
        main(sys.argv[1:])
