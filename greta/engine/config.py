"""Decoder model configuration (a family of engine.layout: Llama, Qwen2): named presets or an HF-style
config.json (which of them a model argument names is greta.engine.source's business)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from greta.engine.layout import FAMILIES, bias_params, family_of, layout_of


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 131072
    family: str = "llama"  # its engine.layout.FAMILIES entry: tensor names, fused groups, biases, shard dims

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one Greta runs ({', '.join(FAMILIES)})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    # --- sizes -----------------------------------------------------------
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each per-layer linear, in HF naming."""
        h, d = self.hidden_size, self.head_dim
        return {
            "q_proj": (self.n_heads * d, h),
            "k_proj": (self.n_kv_heads * d, h),
            "v_proj": (self.n_kv_heads * d, h),
            "o_proj": (h, self.n_heads * d),
            "gate_proj": (self.intermediate_size, h),
            "up_proj": (self.intermediate_size, h),
            "down_proj": (h, self.intermediate_size),
        }

    def layer_linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes().values())

    def param_count(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else emb
        norms = self.n_layers * 2 * self.hidden_size + self.hidden_size
        return emb + head + norms + self.n_layers * (self.layer_linear_params() + bias_params(self))

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def prefill_flops(self, ctx: int) -> float:
        """Layers' linears 2*P*ctx, causal attention 2*L*H*D*ctx^2 (QK^T and PV, halved by the mask),
        and lm_head for the one position whose logits prefill keeps."""
        linears = 2.0 * self.n_layers * self.layer_linear_params() * ctx
        attention = 2.0 * self.n_layers * self.n_heads * self.head_dim * ctx**2
        return linears + attention + 2.0 * self.vocab_size * self.hidden_size

    def decode_bytes(self, pos: int, dtype_bytes: int = 2) -> float:
        """Bytes one decode step must read: every weight but the embedding table, plus the KV cache up to pos."""
        weights = (self.param_count() - self.vocab_size * self.hidden_size) * dtype_bytes
        if self.tie_embeddings:  # the tied table is read once, as lm_head
            weights += self.vocab_size * self.hidden_size * dtype_bytes
        return float(weights + self.kv_bytes_per_token(dtype_bytes) * pos)

    # --- per rank under tensor parallelism (greta.engine.tp: heads, MLP and vocab split, embed and norms not)
    def rank_param_count(self, tp: int = 1) -> int:
        """Parameters one of tp ranks holds: the layers' linears and lm_head split tp ways; the embedding and
        the norms replicated (a tied lm_head is a slice of the replicated embedding)."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else emb // tp
        norms = self.n_layers * 2 * self.hidden_size + self.hidden_size
        return emb + head + norms + self.n_layers * (self.layer_linear_params() + bias_params(self)) // tp

    def allreduce_bytes_per_token(self, tp: int, dtype_bytes: int = 2) -> int:
        """Bytes of partial sums each rank contributes per token: two reductions of hidden per layer (after wo
        and w2); 0 at tp=1. The vocab-parallel logits' gather adds vocab/tp fp32 values per kept row."""
        return 0 if tp == 1 else 2 * self.n_layers * self.hidden_size * dtype_bytes

    def rank_decode_bytes(self, pos: int, tp: int = 1, dtype_bytes: int = 2) -> float:
        """decode_bytes for one of tp ranks: its weights but the embedding table, and its KV heads to pos."""
        if tp == 1:
            return self.decode_bytes(pos, dtype_bytes)
        head = self.vocab_size * self.hidden_size // tp  # lm_head's rows (tied: the embed slice it reads)
        linears = self.n_layers * (self.layer_linear_params() + bias_params(self)) // tp
        norms = self.n_layers * 2 * self.hidden_size + self.hidden_size
        return float((head + linears + norms) * dtype_bytes + self.kv_bytes_per_token(dtype_bytes) * pos / tp)

    def to_dict(self) -> dict:
        return asdict(self)

    # --- constructors ------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict, name: str = "checkpoint") -> "ModelConfig":
        """An HF config.json (transformers 4.x `rope_scaling` + `rope_theta`, or 5.x `rope_parameters`) of a
        family Greta runs (hf_family)."""
        family = hf_family(cfg)
        h = cfg["hidden_size"]
        n_heads = cfg["num_attention_heads"]
        params = dict(cfg.get("rope_parameters") or {})  # transformers 5: rope_theta lives in here
        theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", params.get("type")) else None)
        return cls(
            name=name,
            vocab_size=cfg["vocab_size"],
            hidden_size=h,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or h // n_heads,
            intermediate_size=cfg["intermediate_size"],
            rope_theta=theta,
            rope_scaling=parse_rope_scaling(scaling),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
            family=family,
        )

    def to_hf(self) -> dict:
        lay = layout_of(self)
        d = {
            "architectures": [lay.hf_architecture],
            "model_type": lay.hf_model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
        }
        if self.rope_scaling:
            d["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}  # linear/dynamic keep their rope_type
        return d


def hf_family(cfg: dict) -> str:
    """The engine.layout family of an HF config.json: its `architectures` and `model_type` (absent: llama's)
    must both name one; one line otherwise. A Qwen2 with sliding-window attention is refused (Greta attends
    over every position)."""
    arch, mtype = cfg.get("architectures"), cfg.get("model_type", "llama")
    family = family_of("hf_model_type", mtype)
    if family is None:
        raise ValueError(f"model_type {mtype!r} is not supported: Greta runs model_type "
                         f"{', '.join(repr(f) for f in FAMILIES)} only")
    want = FAMILIES[family].hf_architecture
    if arch is not None and list(arch) != [want]:
        raise ValueError(f"architectures {arch} is not supported for model_type {mtype!r}: Greta runs {want} "
                         "checkpoints of it only")
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or ()):
        raise ValueError("config.json asks for sliding-window attention (use_sliding_window or layer_types): Greta "
                         "attends over every position; use a checkpoint without it")
    return family


def tree_segments(cfg: ModelConfig) -> int:
    """S, the segment count of the tp-invariant mode's tree (docs/TP.md) for this model: 8 times the odd part
    of its KV heads, so every tp the heads allow holds whole subtrees (Llama-3, 8 KV heads: 8, tp 1, 2, 4, 8;
    3 KV heads, as SmolLM2's: 24, tp 1 and 3)."""
    odd = cfg.n_kv_heads
    while odd % 2 == 0:
        odd //= 2
    return 8 * odd


def check_tree(cfg: ModelConfig, segments: int, tp: int = 1) -> None:
    """Refuse (one line) a segment tree that wo's and w2's K do not split into, or one whose subtrees tp
    ranks cannot each hold (S/tp must be a power of two: a rank's segments are then one subtree)."""
    ks = {"n_heads*head_dim": cfg.n_heads * cfg.head_dim, "intermediate_size": cfg.intermediate_size}
    bad = [f"{k}={v}" for k, v in ks.items() if segments < 1 or v % segments]
    per_rank = segments // tp if tp and segments % tp == 0 else 0
    if bad or (tp > 1 and (per_rank < 1 or per_rank & (per_rank - 1))):
        why = f"{', '.join(bad)} of model {cfg.name} must split into S={segments} equal segments" if bad else \
            f"S={segments} must be tp={tp} times a power of two, so each rank holds one subtree"
        raise ValueError(f"tp-invariant tree: {why}; pick S (tree_segments) accordingly or -p tp_invariant=0")


def kv_capacity(tokens: int, block: int) -> int:
    """Positions a KV cache for `tokens` positions holds: tokens rounded up to a whole number of blocks."""
    return -(-tokens // block) * block


def kv_bytes(cfg: "ModelConfig", n_seqs: int, tokens: int, block: int, dtype_bytes: int, heads: int | None = None) -> int:
    """Bytes of a KV cache (engine.kvcache.KVCache) of n_seqs slabs for `tokens` positions each, holding `heads` KV
    heads (default all; a tensor-parallel rank's n_kv_heads / tp): what the preflight holds against the device."""
    per_head = cfg.kv_bytes_per_token(dtype_bytes) // cfg.n_kv_heads
    return n_seqs * kv_capacity(tokens, block) * per_head * (cfg.n_kv_heads if heads is None else heads)


def tp_indivisible(cfg: "ModelConfig", world: int) -> list[str]:
    """The sizes tp=world ranks cannot split evenly ("n_kv_heads=4", ...): heads, KV heads, the MLP and the
    vocabulary are each split across the ranks. [] when it can; the one rule (params, preflight, engine.tp)."""
    sizes = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "intermediate_size": cfg.intermediate_size,
             "vocab_size": cfg.vocab_size}
    return [f"{k}={v}" for k, v in sizes.items() if v % world]


def cache_tokens(max_tokens: int, chunk: int) -> int:
    """Positions a runner's KV cache is made for (runner.Runner, each slab; preflight sizes
    it the same): every token of the run plus one prefill chunk of headroom, as a chunk is written whole."""
    return max_tokens + chunk


# rope_scaling types Greta computes, with the keys each needs (as transformers' Llama reads them).
# A scaling dict without "rope_type" is llama3 (the presets' form); other types keep their "rope_type".
ROPE_TYPES = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
    "dynamic": ("factor",),
}


def parse_rope_scaling(scaling: dict | None) -> dict | None:
    """HF rope_scaling -> ModelConfig.rope_scaling (None for default rope); one-line refusal otherwise."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("default", None):
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}); "
                         "edit config.json or use a preset")
    missing = [k for k in ROPE_TYPES[kind] if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling type {kind!r} lacks {', '.join(missing)}")
    out = {k: float(scaling[k]) if k != "original_max_position_embeddings" else int(scaling[k])
           for k in ROPE_TYPES[kind]}
    return out if kind == "llama3" else {"rope_type": kind, **out}


def rope_type(cfg: "ModelConfig") -> str:
    s = cfg.rope_scaling
    return "default" if not s else s.get("rope_type", "llama3")


LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        name="llama3-8b", vocab_size=128256, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, intermediate_size=14336, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, rms_eps=1e-5,
    ),
    "llama2-7b": ModelConfig(
        name="llama2-7b", vocab_size=32000, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        head_dim=128, intermediate_size=11008, rope_theta=10000.0, rope_scaling=None, rms_eps=1e-5,
        max_position_embeddings=4096,
    ),
    # Llama-3-70B as published: no rope scaling, trained to 8192 positions (synthetic weights run past them)
    "llama3-70b": ModelConfig(
        name="llama3-70b", vocab_size=128256, hidden_size=8192, n_layers=80, n_heads=64, n_kv_heads=8,
        head_dim=128, intermediate_size=28672, rope_theta=500000.0, rope_scaling=None, rms_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # Llama-3.1-70B: the same shapes, llama3 rope scaling to 131072 positions (as llama3-8b's)
    "llama3.1-70b": ModelConfig(
        name="llama3.1-70b", vocab_size=128256, hidden_size=8192, n_layers=80, n_heads=64, n_kv_heads=8,
        head_dim=128, intermediate_size=28672, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, rms_eps=1e-5,
    ),
    # Same family (GQA 4:1, llama3 rope scaling, SwiGLU), small enough for a 2-core CPU at ctx 32768.
    "tiny": ModelConfig(
        name="tiny", vocab_size=2048, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=1,
        head_dim=32, intermediate_size=384, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
        rms_eps=1e-5,
    ),
    # tiny's family with 8 heads and 4 KV heads, so tensor parallelism can split them 2 or 4 ways (the CPU
    # tests of the probe under tp: tests/test_tp_probe.py; the engine's: tests/test_tp.py)
    "tiny-tp": ModelConfig(
        name="tiny-tp", vocab_size=2048, hidden_size=128, n_layers=2, n_heads=8, n_kv_heads=4,
        head_dim=16, intermediate_size=384, rope_theta=500000.0, rms_eps=1e-5,
    ),
    # Qwen2-0.5B's shapes as its config.json publishes them: q/k/v biases, a tied head, rope theta 1e6
    "qwen2-0.5b": ModelConfig(
        name="qwen2-0.5b", vocab_size=151936, hidden_size=896, n_layers=24, n_heads=14, n_kv_heads=2,
        head_dim=64, intermediate_size=4864, rope_theta=1000000.0, rms_eps=1e-6, tie_embeddings=True,
        max_position_embeddings=131072, family="qwen2",
    ),
    # its family (14 heads, 2 KV heads: tp 1 and 2; biases, tied head) at tiny's size, for the CPU tests
    "qwen2-tiny": ModelConfig(
        name="qwen2-tiny", vocab_size=2048, hidden_size=224, n_layers=2, n_heads=14, n_kv_heads=2,
        head_dim=16, intermediate_size=384, rope_theta=1000000.0, rms_eps=1e-6, tie_embeddings=True,
        family="qwen2",
    ),
}


def inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> list[float]:
    """Rotary inverse frequencies, as transformers' Llama computes them for each rope_scaling type.

    default: theta^(-i/d). linear: divided by factor. freq_factors (from GGUF): divided by each factor. llama3: the banded rescaling of
    _compute_llama3_parameters. dynamic (NTK): theta is raised to
    theta * (factor * L / max_pos - (factor - 1)) ^ (d / (d - 2)) with L = max(seq_len, max_pos), the value
    transformers uses for one forward pass over seq_len tokens (Greta fixes L for a whole run: runner.rope_tables).
    """
    d, s, kind = cfg.head_dim, cfg.rope_scaling, rope_type(cfg)
    theta = cfg.rope_theta
    if kind == "dynamic":
        mp = cfg.max_position_embeddings
        L = max(seq_len or mp, mp)
        theta = theta * ((s["factor"] * L / mp) - (s["factor"] - 1)) ** (d / (d - 2))
    inv = [1.0 / (theta ** (i / d)) for i in range(0, d, 2)]
    if kind == "linear":
        return [f / s["factor"] for f in inv]
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: per-frequency divisors (llama.cpp's llama3 form)
        return [f / x for f, x in zip(inv, s["factors"])]
    if kind != "llama3":
        return inv
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old / lo, old / hi
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < hi_wavelen:
            out.append(f)
        elif wavelen > lo_wavelen:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


__all__ = ["ModelConfig", "PRESETS", "check_tree", "inv_freq", "kv_capacity", "parse_rope_scaling", "tree_segments"]
