"""The decoder (Llama and the families engine.layout describes): one layer loop over an ops backend
(greta/engine/ops).

The loop says WHAT the decoder computes (embed, per layer: norm, fused QKV (plus its bias where the family has
one: Qwen2), RoPE, KV write, attention, output projection, norm, fused gate/up, SwiGLU, down projection; final
norm and lm_head). HOW each op rounds is
the backend's: plain torch for kv_aligned=0, tiled torch or the Triton kernels for kv_aligned=1, wrapped by
a negative control where the probe asks for one. Sizes per layer are read from the weights, not the
config, so a backend holding a shard of the heads runs the same loop.
"""
from __future__ import annotations

import torch

from greta.engine.config import ModelConfig
from greta.engine.layout import layout_of
from greta.engine.ops import Ops, Step


def forward(ops: Ops, cfg: ModelConfig, w: dict[str, torch.Tensor], cache, step: Step) -> torch.Tensor:
    """One call's rows through the decoder -> fp32 logits [len(step.rows), V]. cache.layer(i) -> (k, v)."""
    D, eps, qkv_bias = cfg.head_dim, cfg.rms_eps, layout_of(cfg).qkv_bias
    x = ops.embed(w["embed"], step)
    h = ops.rmsnorm(x, w["0.attn_norm"], eps)
    for i in range(cfg.n_layers):
        qkv_w, wo = w[f"{i}.wqkv"], w[f"{i}.wo"]
        q_cols = wo.shape[1]                     # H * D
        kv_cols = (qkv_w.shape[0] - q_cols) // 2  # Hkv * D
        qkv = ops.linear(h, qkv_w)
        if qkv_bias:
            qkv = ops.add_bias(qkv, w[f"{i}.bqkv"])
        q = ops.rope(qkv[:, :q_cols].view(-1, q_cols // D, D), step)
        k = ops.rope(qkv[:, q_cols:q_cols + kv_cols].view(-1, kv_cols // D, D), step)
        v = qkv[:, q_cols + kv_cols:].view(-1, kv_cols // D, D)
        kv = cache.layer(i)
        ops.write_kv(kv, k, v, step)
        attend = ops.decode_attention if step.decode else ops.prefill_attention
        a = attend(q, kv, step)
        h, x = ops.add_rmsnorm(x, ops.linear_reduce(a.reshape(-1, q_cols), wo, step), w[f"{i}.mlp_norm"], eps)
        gu = ops.linear(h, w[f"{i}.w13"])
        inter = gu.shape[1] // 2
        d = ops.linear_reduce(ops.swiglu(gu[:, :inter], gu[:, inter:]), w[f"{i}.w2"], step)
        if i + 1 < cfg.n_layers:  # the residual add and the next layer's norm, fused where the backend can
            h, x = ops.add_rmsnorm(x, d, w[f"{i + 1}.attn_norm"], eps)
        else:
            x = x + d
    return ops.lm_head(x, w["norm"], w["lm_head"], eps, step)
