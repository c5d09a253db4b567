"""Model weights: seeded synthetic init with the real shapes, or a local HF checkpoint (safetensors).

Internal names (fused where both paths always multiply together):
  embed, lm_head, norm, and per layer i: i.attn_norm, i.wqkv (q;k;v rows), i.wo, i.mlp_norm, i.w13 (gate;up rows), i.w2
Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import torch

from .config import ModelConfig


def synthetic(cfg: ModelConfig, seed: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Gaussian weights, deterministic per (seed, tensor name, device type).

    Scales keep 32 layers at 32k context finite and not degenerate: inputs to each matmul have unit RMS
    (RMSNorm), so W ~ N(0, 1/fan_in) keeps outputs near unit RMS; the two projections that write the
    residual stream (wo, w2) are further scaled by 1/sqrt(2 * n_layers), so the stream grows slowly; the
    embedding is N(0, 1), so each position's logits depend strongly on its own token and argmaxes vary.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    resid = 1.0 / math.sqrt(2 * cfg.n_layers)
    shapes: dict[str, tuple[tuple[int, ...], float]] = {"embed": ((cfg.vocab_size, h), 1.0)}
    for i in range(cfg.n_layers):
        qkv_rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * d
        shapes[f"{i}.wqkv"] = ((qkv_rows, h), 1 / math.sqrt(h))
        shapes[f"{i}.wo"] = ((h, cfg.n_heads * d), resid / math.sqrt(cfg.n_heads * d))
        shapes[f"{i}.w13"] = ((2 * cfg.intermediate_size, h), 1 / math.sqrt(h))
        shapes[f"{i}.w2"] = ((h, cfg.intermediate_size), resid / math.sqrt(cfg.intermediate_size))
    if not cfg.tie_embeddings:
        shapes["lm_head"] = ((cfg.vocab_size, h), 1 / math.sqrt(h))
    w = {}
    gen = torch.Generator(device=device)
    for name, (shape, std) in shapes.items():
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        w[name] = torch.randn(shape, generator=gen, dtype=dtype, device=device).mul_(std)
    for i in range(cfg.n_layers):
        w[f"{i}.attn_norm"] = torch.ones(h, dtype=dtype, device=device)
        w[f"{i}.mlp_norm"] = torch.ones(h, dtype=dtype, device=device)
    w["norm"] = torch.ones(h, dtype=dtype, device=device)
    if cfg.tie_embeddings:
        w["lm_head"] = w["embed"]
    return w


def synthetic_hash(cfg: ModelConfig, seed: int) -> str:
    blob = json.dumps({"config": cfg.to_dict(), "seed": seed, "init": "greta-synthetic-v1"}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


# --- HF checkpoints -------------------------------------------------------------------------
def _hf_names(cfg: ModelConfig) -> dict[str, str]:
    n = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    if not cfg.tie_embeddings:
        n["lm_head"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        n[f"{i}.attn_norm"] = p + "input_layernorm.weight"
        n[f"{i}.mlp_norm"] = p + "post_attention_layernorm.weight"
        n[f"{i}.wo"] = p + "self_attn.o_proj.weight"
        n[f"{i}.w2"] = p + "mlp.down_proj.weight"
    return n


def load_checkpoint(path, cfg: ModelConfig, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Load config.json + *.safetensors from a local directory (HF Llama layout)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}; a checkpoint directory needs config.json and safetensors files")
    raw: dict[str, torch.Tensor] = {}
    dev = str(device)
    for f in files:
        with safe_open(str(f), framework="pt", device=dev) as sf:
            for k in sf.keys():
                raw[k] = sf.get_tensor(k).to(dtype)
    w = {}
    for ours, theirs in _hf_names(cfg).items():
        if theirs not in raw:
            raise KeyError(f"checkpoint {path} lacks tensor {theirs}")
        w[ours] = raw.pop(theirs)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        w[f"{i}.wqkv"] = torch.cat([raw.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        w[f"{i}.w13"] = torch.cat([raw.pop(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
    if cfg.tie_embeddings:
        w["lm_head"] = w["embed"]
    return w


def save_checkpoint(w: dict[str, torch.Tensor], cfg: ModelConfig, path) -> Path:
    """Write weights as an HF-style checkpoint directory (used by tests; unfuses wqkv and w13)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    out = {theirs: w[ours].contiguous().cpu() for ours, theirs in _hf_names(cfg).items()}
    d, q = cfg.head_dim, cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * d
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for name, t in zip("qkv", w[f"{i}.wqkv"].split([q, kv, kv])):
            out[p + f"self_attn.{name}_proj.weight"] = t.contiguous().cpu()
        for name, t in zip(("gate", "up"), w[f"{i}.w13"].chunk(2)):
            out[p + f"mlp.{name}_proj.weight"] = t.contiguous().cpu()
    save_file(out, str(path / "model.safetensors"))
    return path


def checkpoint_hash(path) -> str:
    """sha256 over config.json and every safetensors file's bytes."""
    h = hashlib.sha256()
    for f in [Path(path) / "config.json", *sorted(Path(path).glob("*.safetensors"))]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()
