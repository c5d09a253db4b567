"""Model weights: seeded synthetic init with the real shapes, or a local HF checkpoint (safetensors;
GGUF files: greta/gguf.py).

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


class CheckpointError(ValueError):
    """A checkpoint that can't be loaded: one line naming the file or tensor at fault."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs is not there."""


class CheckpointTensorMissing(CheckpointError, KeyError):
    """A tensor the config implies is in no file (str() is the plain message, not KeyError's repr)."""


# tensors some HF checkpoints carry that Llama doesn't use (older transformers saved the rope buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a Llama checkpoint of this config must hold."""
    h, v = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, h)
    lin = cfg.linear_shapes()
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for x in ("q", "k", "v", "o"):
            out[p + f"self_attn.{x}_proj.weight"] = lin[f"{x}_proj"]
        for x in ("gate", "up", "down"):
            out[p + f"mlp.{x}_proj.weight"] = lin[f"{x}_proj"]
    return out


def _safe_open(f: Path, device: str, stack):
    from safetensors import safe_open

    try:
        return stack.enter_context(safe_open(str(f), framework="pt", device=device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"safetensors file {f} is truncated or corrupted ({' '.join(str(e).split())[:160]})") from None


def checkpoint_files(path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those model.safetensors.index.json names, else
    model.safetensors, else every *.safetensors. Raises CheckpointError naming what is missing."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointFileMissing(f"checkpoint {d} is not a directory")
    if not (d / "config.json").is_file():
        raise CheckpointFileMissing(f"checkpoint {d} has no config.json")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map: {e})") from None
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise CheckpointFileMissing(f"checkpoint {d}: {index.name} names missing shard file(s) {', '.join(missing)}")
        return [d / n for n in names]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointFileMissing(f"no *.safetensors in {d}; a checkpoint directory needs config.json and safetensors files")
    return files


def load_checkpoint(path, cfg: ModelConfig, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Load a local HF Llama checkpoint (config.json + model.safetensors, or shards + index.json).

    Files are memory-mapped (safetensors' safe_open) and tensors are taken one at a time, converted to
    dtype on the target device and fused (q;k;v, gate;up) layer by layer, so the host never holds a second
    full copy of the weights. Names and shapes are checked against the config before any data is read:
    missing, extra and misshapen tensors are each named in a one-line CheckpointError.
    """
    from contextlib import ExitStack

    files = checkpoint_files(path)
    want = expected_tensors(cfg)
    dev = str(device)
    with ExitStack() as stack:
        where: dict[str, object] = {}
        for f in files:
            sf = _safe_open(f, dev, stack)
            for k in sf.keys():
                where[k] = (sf, f)
        missing = [k for k in want if k not in where]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointTensorMissing(f"checkpoint {path} lacks tensor(s) {', '.join(missing[:3])}{more}")
        extra = [k for k in where if k not in want and not k.endswith(_IGNORED_SUFFIXES)
                 and not (cfg.tie_embeddings and k == "lm_head.weight")]
        if extra:
            more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
            raise CheckpointError(f"checkpoint {path} has unexpected tensor(s) {', '.join(sorted(extra)[:3])}{more} "
                                  "for a LlamaForCausalLM of this config.json")
        for k, shape in want.items():
            got = tuple(where[k][0].get_slice(k).get_shape())
            if got != shape:
                raise CheckpointError(f"checkpoint {path}: tensor {k} has shape {list(got)}, config.json implies {list(shape)}")

        def get(k: str) -> torch.Tensor:
            sf, f = where[k]
            try:
                t = sf.get_tensor(k)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"safetensors file {f} is truncated or corrupted at tensor {k} "
                                      f"({' '.join(str(e).split())[:160]})") from None
            return t.to(dtype)

        w = {ours: get(theirs) for ours, theirs in _hf_names(cfg).items()}
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            w[f"{i}.wqkv"] = torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            w[f"{i}.w13"] = torch.cat([get(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
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
    """sha256 over config.json and every safetensors file's bytes; of a .gguf file, over its bytes."""
    h = hashlib.sha256()
    files = [Path(path)] if Path(path).is_file() else [Path(path) / "config.json", *sorted(Path(path).glob("*.safetensors"))]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()
