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

engine=llamacpp: llama.cpp through llama-cpp-python on the same .gguf file (it reads no checkpoint directory),
on the CPU, with its own kernels (quantized blocks multiplied directly) and its context's f16 KV cache: prefill
evaluates Greta's prompt ids (not llama.cpp's tokenizer: the probe owns the prompt) with logits_all, decode
evaluates one id at the context's length, the reference is a fresh evaluation after reset.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch

ENGINES = ("greta", "hf", "llamacpp")


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
        _check_prefill("hf", self.cache, start, seq)
        keep = [tokens.numel() - 1] if keep is None else keep
        logits = self._logits(tokens, keep)
        if progress:
            progress(tokens.numel(), tokens.numel())
        return logits

    def decode(self, token, pos: int) -> torch.Tensor:
        _check_decode("hf", self.cache, pos)
        return self._logits(torch.as_tensor(token, device=self.device).reshape(1), [0])[0]


# llama.cpp pads its context to a multiple of 256 positions (asked for 64, it holds 256): the adapter asks for
# that size itself, so the cache's capacity and bytes are the ones llama.cpp allocates.
LLAMACPP_CTX_PAD = 256
LLAMACPP_BATCH = 512  # llama.cpp's own default prefill chunk (n_batch): its prefill path as people run it


class _LlamaCppCache:
    """The adapter's view of a llama.cpp context's KV cache: reset, its bytes, its positions."""

    def __init__(self, llm, cfg):
        self.llm, self.capacity = llm, llm.n_ctx()
        self._per_token = cfg.kv_bytes_per_token(2)  # K and V in f16, llama.cpp's default type_k/type_v

    def reset(self, b: int | None = None) -> None:
        """Forget every position: llama-cpp-python's reset only rewinds its token count, so the context's KV
        memory is cleared too (a prefill after it computes what a fresh context does: tested)."""
        import llama_cpp

        _one_sequence(b or 0)
        self.llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)

    def length(self) -> int:
        return self.llm.n_tokens

    def nbytes(self) -> int:
        return self._per_token * self.capacity  # n_ctx * n_layers * 2 (K, V) * n_kv_heads * head_dim * 2 bytes


class LlamaCppEngine:
    """engine=llamacpp (module docstring): llama.cpp's own CPU paths on the same .gguf file."""

    def __init__(self, model: str, cfg, dtype: torch.dtype, device: torch.device, max_tokens: int):
        from greta.engine.source import model_path

        llama_cpp = llama_cpp_module()
        path = Path(model_path(model))
        if path.suffix != ".gguf" or torch.device(device).type != "cpu":
            raise ValueError(f"engine=llamacpp runs a .gguf file on the CPU, not {path.name} on {device}")
        n_ctx = -(-max_tokens // LLAMACPP_CTX_PAD) * LLAMACPP_CTX_PAD
        threads = torch.get_num_threads()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=LLAMACPP_BATCH, logits_all=True,
                                   n_gpu_layers=0, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
        self.cache = _LlamaCppCache(self.llm, cfg)
        build = llama_cpp.llama_version().decode(errors="replace")
        self.about = {"name": "llamacpp", "version": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp {build})",
                      "cache": "llama.cpp context KV cache (f16 K and V)",
                      "attention": f"llama.cpp CPU attention, flash_attn off, n_batch {LLAMACPP_BATCH}",
                      "weights": f"llama.cpp multiplies the quantized blocks directly ({_file_type(self.llm)}, no "
                                 "dequantization to fp32)",
                      "threads": threads}

    def weight_bytes(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_model_size(self.llm.model))

    def _eval(self, ids: list[int], progress=None) -> None:
        """Greta's ids through llama.cpp's eval, n_batch at a time (its own chunks), with progress."""
        if self.cache.length() + len(ids) > self.cache.capacity:
            raise ValueError(f"engine=llamacpp holds {self.cache.capacity} positions; {self.cache.length()} + "
                             f"{len(ids)} do not fit")
        for i in range(0, len(ids), LLAMACPP_BATCH):
            self.llm.eval(ids[i:i + LLAMACPP_BATCH])
            if progress:
                progress(min(i + LLAMACPP_BATCH, len(ids)), len(ids))

    def _rows(self, rows: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.llm.scores[rows].astype("float32", copy=True))

    def prefill(self, tokens: torch.Tensor, start: int = 0, keep: list[int] | None = None, progress=None,
                seq: int = 0) -> torch.Tensor:
        _check_prefill("llamacpp", self.cache, start, seq)
        keep = [tokens.numel() - 1] if keep is None else keep
        self._eval([int(t) for t in tokens.reshape(-1).tolist()], progress)
        return self._rows(keep)

    def decode(self, token, pos: int) -> torch.Tensor:
        _check_decode("llamacpp", self.cache, pos)
        self._eval([int(token)])
        return self._rows([pos])[0]


def _file_type(llm) -> str:
    """The model's quantization as llama.cpp names it (the last word of its description, e.g. Q4_1)."""
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(128)
    llama_cpp.llama_model_desc(llm.model, buf, len(buf))
    return buf.value.decode(errors="replace").split()[-1]


def llama_cpp_module():
    """llama-cpp-python, or one line saying how to install it (it compiles llama.cpp: no prebuilt wheel on PyPI)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise EngineMissing("engine=llamacpp needs llama-cpp-python: pip install -e '.[llamacpp]' (pip install "
                            "llama-cpp-python==0.3.36 compiles llama.cpp with cmake and a C compiler: minutes)")
    import llama_cpp

    return llama_cpp


def _check_prefill(engine: str, cache, start: int, seq: int) -> None:
    """What every adapter's prefill takes: its one sequence, from position 0, into an empty cache."""
    _one_sequence(seq)
    if start or cache.length():
        raise ValueError(f"engine={engine} prefills from position 0 into an empty cache (reset it first)")


def _check_decode(engine: str, cache, pos: int) -> None:
    """An adapter decodes the next position only: the cache's length."""
    if pos != cache.length():
        raise ValueError(f"engine={engine} decodes at the cache's length {cache.length()}, not position {pos}")


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


def require_engine(name: str) -> None:
    """The peer engine `name` is installed, or EngineMissing: one line with the pip command."""
    {"hf": hf_transformers, "llamacpp": llama_cpp_module}[name]()


def make_engine(name: str, model: str, cfg, dtype: torch.dtype, device: torch.device, max_tokens: int):
    """The peer adapter for engine `name` (not greta: the job builds Greta's own Runner)."""
    if name == "hf":
        return HFEngine(model, cfg, dtype, device, max_tokens)
    if name == "llamacpp":
        return LlamaCppEngine(model, cfg, dtype, device, max_tokens)
    raise ValueError(f"engine={name!r} is not one of {', '.join(ENGINES)}")
