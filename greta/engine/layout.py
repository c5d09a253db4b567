"""A model family's layout as data: the tensors a decoder holds (their shapes in the config's sizes), how Greta
fuses them, the dim tensor parallelism cuts each along, and how each file format spells them.

The readers are the loaders (engine.weights for HF safetensors, engine.gguf), the synthetic init
(weights.synthetic), the shards (engine.tp) and the one decoder loop (model.forward, which asks only whether
the family has a q/k/v bias). A new family of the same decoder shape is one `Layout` in FAMILIES; one whose
arithmetic differs also needs that op in the `Ops` interface (as Qwen2's bias needed `Ops.add_bias`).
Plain data, no torch: record.params reads the presets (engine.config) without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Tensor:
    """One tensor of the checkpoint. shape: sizes by name (`sizes`); shard: the dim a tensor-parallel rank's
    slice is cut along (0: column-parallel, its output rows; 1: row-parallel, its input columns), None:
    every rank holds it whole; hf, gguf: its name in each file format (per-layer ones after the layer prefix);
    kind: norm, embed, weight (a projection) or bias, which the synthetic init draws each its own way."""
    shape: tuple[str, ...]
    shard: int | None
    hf: str
    gguf: str
    kind: str = "weight"


def _proj(rows: str, cols: str, shard: int, hf: str, gguf: str) -> Tensor:
    return Tensor((rows, cols), shard, hf + ".weight", gguf + ".weight")


def _norm(hf: str, gguf: str) -> Tensor:
    return Tensor(("hidden",), None, hf, gguf, "norm")


TOP = {  # every family's: the embedding, the final norm, the output head (absent from a tied checkpoint)
    "embed": Tensor(("vocab", "hidden"), None, "model.embed_tokens.weight", "token_embd.weight", "embed"),
    "norm": _norm("model.norm.weight", "output_norm.weight"),
    "lm_head": Tensor(("vocab", "hidden"), 0, "lm_head.weight", "output.weight"),
}

LLAMA_LAYER = {
    "attn_norm": _norm("input_layernorm.weight", "attn_norm.weight"),
    "mlp_norm": _norm("post_attention_layernorm.weight", "ffn_norm.weight"),
    "q": _proj("q", "hidden", 0, "self_attn.q_proj", "attn_q"),
    "k": _proj("kv", "hidden", 0, "self_attn.k_proj", "attn_k"),
    "v": _proj("kv", "hidden", 0, "self_attn.v_proj", "attn_v"),
    "o": _proj("hidden", "q", 1, "self_attn.o_proj", "attn_output"),
    "gate": _proj("inter", "hidden", 0, "mlp.gate_proj", "ffn_gate"),
    "up": _proj("inter", "hidden", 0, "mlp.up_proj", "ffn_up"),
    "down": _proj("hidden", "inter", 1, "mlp.down_proj", "ffn_down"),
}

QKV_BIAS = {f"{x}_bias": Tensor((rows,), 0, f"self_attn.{x}_proj.bias", f"attn_{x}.bias", "bias")
            for x, rows in (("q", "q"), ("k", "kv"), ("v", "kv"))}

# Greta's per-layer weights -> the roles each stacks by rows, in this order (both paths always multiply them
# together, so one linear computes them; a column-parallel rank re-stacks its rows of each part)
LLAMA_FUSED = {"attn_norm": ("attn_norm",), "mlp_norm": ("mlp_norm",), "wqkv": ("q", "k", "v"), "wo": ("o",),
               "w13": ("gate", "up"), "w2": ("down",)}


@dataclass(frozen=True)
class Layout:
    """A decoder family. hf_architecture / hf_config: transformers' class names (config.json's
    `architectures`, and the oracle's classes); hf_model_type: config.json's model_type; gguf_arch:
    general.architecture of a GGUF file; gguf_rope_permuted: llama.cpp's converter permuted the q/k rows
    of this family into interleaved RoPE pairs (Llama; not Qwen2, which it writes in HF's rotate-half
    order)."""
    family: str
    hf_architecture: str
    hf_config: str
    hf_model_type: str
    gguf_arch: str
    gguf_rope_permuted: bool
    layer: Mapping[str, Tensor]
    fused: Mapping[str, tuple[str, ...]]
    top: Mapping[str, Tensor] = field(default_factory=lambda: MappingProxyType(TOP))
    residual_writers: tuple[str, ...] = ("wo", "w2")  # their products are added to the residual stream
    hf_layer_prefix: str = "model.layers.{}."
    gguf_layer_prefix: str = "blk.{}."

    @property
    def qkv_bias(self) -> bool:
        """The q/k/v projections add a bias (Greta's `{i}.bqkv`, stacked as wqkv's rows)."""
        return "bqkv" in self.fused

    def tensor(self, role: str) -> Tensor:
        """The Tensor of a role: "embed", or a per-layer one with or without its layer ("3.q", "q")."""
        part = role.rpartition(".")[2]
        return self.top[part] if part in self.top else self.layer[part]

    def parts(self, name: str) -> tuple[str, ...]:
        """The roles Greta's weight `name` ("3.wqkv", "lm_head", ...) stacks; a top-level one is itself."""
        part = name.rpartition(".")[2]
        return (part,) if part in self.top else self.fused[part]


def _family(family: str, hf: str, gguf: str, *, permuted: bool, bias: bool) -> Layout:
    layer = {**LLAMA_LAYER, **(QKV_BIAS if bias else {})}
    fused = {**LLAMA_FUSED, **({"bqkv": tuple(QKV_BIAS)} if bias else {})}
    return Layout(family, f"{hf}ForCausalLM", f"{hf}Config", family, gguf, permuted,
                  MappingProxyType(layer), MappingProxyType(fused))


FAMILIES: dict[str, Layout] = {
    "llama": _family("llama", "Llama", "llama", permuted=True, bias=False),
    "qwen2": _family("qwen2", "Qwen2", "qwen2", permuted=False, bias=True),
}


def layout_of(cfg) -> Layout:
    """The Layout of a ModelConfig's family."""
    return FAMILIES[cfg.family]


def family_of(field: str, value: str) -> str | None:
    """The family whose Layout has `value` in field (hf_architecture, hf_model_type, gguf_arch), else None."""
    return next((f for f, lay in FAMILIES.items() if getattr(lay, field) == value), None)


def sizes(cfg) -> dict[str, int]:
    """The named sizes Tensor.shape is written in."""
    return {"hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "q": cfg.n_heads * cfg.head_dim,
            "kv": cfg.n_kv_heads * cfg.head_dim, "inter": cfg.intermediate_size}


def role_shape(cfg, role: str) -> tuple[int, ...]:
    """The shape of a role's tensor for this config."""
    n = sizes(cfg)
    return tuple(n[s] for s in layout_of(cfg).tensor(role).shape)


def part_rows(cfg, name: str) -> list[int]:
    """The row count of each role Greta's weight `name` stacks ("3.wqkv": q, k, v rows)."""
    return [role_shape(cfg, p)[0] for p in layout_of(cfg).parts(name)]


def bias_params(cfg) -> int:
    """Parameters of one layer's biases (0 for Llama)."""
    return sum(prod(role_shape(cfg, r)) for r, t in layout_of(cfg).layer.items() if t.kind == "bias")


def fused_shape(cfg, name: str) -> tuple[int, ...]:
    """The shape of Greta's weight `name` ("3.wqkv": its parts' rows stacked)."""
    first = layout_of(cfg).parts(name)[0]
    return (sum(part_rows(cfg, name)), *role_shape(cfg, first)[1:])


def weight_names(cfg) -> list[str]:
    """Greta's weight dict's names: the top-level ones (lm_head too when tied: then it is embed), and per
    layer i "{i}.<fused name>"."""
    return [*layout_of(cfg).top, *(f"{i}.{f}" for i in range(cfg.n_layers) for f in layout_of(cfg).fused)]


__all__ = ["FAMILIES", "Layout", "Tensor", "bias_params", "family_of", "fused_shape", "layout_of", "part_rows", "role_shape",
           "sizes", "weight_names"]
