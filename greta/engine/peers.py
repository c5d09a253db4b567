"""Peer engines under audit: the same B3.77 probe through another engine's own prefill and decode paths.

B3.77's job (greta/probe/b3_77_worker.py) drives an engine through four calls, the engine adapter interface
(docs/ENGINES.md), which Greta's own Runner has and each peer's adapter gives:

    cache.reset()                        forget every position (a fresh KV cache)
    prefill(tokens, keep=None, progress) one forward over tokens from position 0 into the cache; fp32 logits
                                         [len(keep), vocab] at the absolute positions keep (default: the last)
    decode(token, pos)                   one token at position pos (= the cache's length) from the cache; fp32 [vocab]
    cache.nbytes(), cache.capacity       the KV cache's bytes and positions, for the record
and `about`, what the record says of the engine (name, version, its cache and attention implementation).

engine=hf: HF transformers running the same model file itself (a .gguf through its GGUF loader, which needs
accelerate; or an HF checkpoint directory), its own dequantization, kernels and DynamicCache: prefill is one
forward of its model over the prompt, decode its one-token step on that cache, the reference a fresh
forward over prompt + generated tokens. Greta's weights are not loaded.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch

ENGINES = ("greta", "hf")


class EngineMissing(ValueError):
    """A peer engine that is not installed: one line with the pip command."""


class _HFCache:
    """The adapter's view of a transformers DynamicCache: reset, its bytes, its positions."""

    def __init__(self, cfg, capacity: int, dtype_bytes: int):
        self.capacity, self._per_token = capacity, cfg.kv_bytes_per_token(dtype_bytes)
        self.reset()

    def reset(self, b: int | None = None) -> None:
        """Forget every position (b: the one sequence an adapter holds, 0, or None)."""
        from transformers import DynamicCache

        _one_sequence(b or 0)

        self.kv = DynamicCache()

    def length(self) -> int:
        return self.kv.get_seq_length()

    def nbytes(self) -> int:
        return self._per_token * self.capacity  # what it holds at the end of the run: every position


class HFEngine:
    """engine=hf (module docstring)."""

    def __init__(self, model: str, cfg, dtype: torch.dtype, device: torch.device, max_tokens: int):
        from greta.engine.source import model_path

        tf = hf_transformers()
        path = Path(model_path(model))
        kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        self.model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=dtype, **kw)
        self.model = self.model.to(device).eval()
        self.device = device
        # the cache argument is `cache` since transformers 5.x (`past_key_values` before, deprecated after)
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.model.forward).parameters else "past_key_values"
        self.cache = _HFCache(cfg, max_tokens, torch.finfo(dtype).bits // 8)
        self.about = {"name": "hf", "version": f"transformers {tf.__version__}", "cache": "DynamicCache",
                      "attention": str(getattr(self.model.config, "_attn_implementation", None)),
                      "weights": "read by transformers from " + ("its GGUF loader" if kw else "the checkpoint")}

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.model.parameters())

    @torch.inference_mode()
    def _logits(self, ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        out = self.model.model(input_ids=ids.reshape(1, -1).to(self.device), use_cache=True, **{self._cache_arg: self.cache.kv})
        return self.model.lm_head(out.last_hidden_state[0, rows]).float()

    def prefill(self, tokens: torch.Tensor, start: int = 0, keep: list[int] | None = None, progress=None,
                seq: int = 0) -> torch.Tensor:
        _one_sequence(seq)
        if start or self.cache.length():
            raise ValueError("engine=hf prefills from position 0 into an empty cache (reset it first)")
        keep = [tokens.numel() - 1] if keep is None else keep
        logits = self._logits(tokens, keep)
        if progress:
            progress(tokens.numel(), tokens.numel())
        return logits

    def decode(self, token, pos: int) -> torch.Tensor:
        if pos != self.cache.length():
            raise ValueError(f"engine=hf decodes at the cache's length {self.cache.length()}, not position {pos}")
        return self._logits(torch.as_tensor(token, device=self.device).reshape(1), [0])[0]


def _one_sequence(b: int) -> None:
    """A peer engine's adapter holds one sequence (B3.77's request): sequence 0."""
    if b != 0:
        raise ValueError(f"a peer engine's adapter holds one sequence (0), not sequence {b}")


def hf_transformers():
    """transformers, with accelerate where it needs it for GGUF files, or one line saying what to install."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
        raise EngineMissing("engine=hf needs transformers and accelerate: pip install -e '.[test]'")
    import transformers

    return transformers


def make_engine(name: str, model: str, cfg, dtype: torch.dtype, device: torch.device, max_tokens: int):
    """The peer adapter for engine `name` (not greta: the job builds Greta's own Runner)."""
    if name == "hf":
        return HFEngine(model, cfg, dtype, device, max_tokens)
    raise ValueError(f"engine={name!r} is not one of {', '.join(ENGINES)}")
