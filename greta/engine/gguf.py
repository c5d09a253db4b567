"""GGUF files (llama.cpp's format) of the families engine.layout knows (llama, qwen2), read with the `gguf`
package (pip install greta[models]).

Metadata maps to a ModelConfig (gguf_config); tensors load as F32, F16 or BF16, or are dequantized from
the block types of engine.gguf_quants (Q4_0 to Q8_0, Q2_K to Q6_K) to the run's dtype on load (load_gguf). The file is memory-mapped and tensors are taken one
at a time. llama.cpp's converter permutes the rows of a Llama's attn_q and attn_k (interleaved RoPE pairs;
a Qwen2's it leaves in HF's order); they are permuted back to the HF rotate-half layout Greta uses. Llama-3.1 files carry their llama3 rope
scaling as a `rope_freqs.weight` tensor of per-frequency divisors, used as they are.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from greta.engine.config import ModelConfig
from greta.engine.gguf_quants import KNOWN_TYPES, UnknownTypeError, dequantize
from greta.engine.layout import FAMILIES, family_of, layout_of
from greta.engine.weights import CheckpointError, assemble, check_tensors, expected_tensors, tensor_names
from greta.paths import record_name


class GGUFError(ValueError):
    """A GGUF file Greta can't load: one line naming the file, key or tensor at fault."""


GGUF_MAGIC = b"GGUF"


def check_gguf_header(path) -> None:
    """Cheap check before anything maps the file: its first 4 bytes are the GGUF magic."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (its first 4 bytes are {head!r}, not {GGUF_MAGIC!r}); "
                        "pass a llama.cpp .gguf file")


def gguf_reader(path):
    """The file's GGUFReader, shared by the config, the tensors and the tokenizer of one process: parsing
    the metadata of a real file takes seconds (SmolLM2: 5 s, its 49152 tokens and 48900 merges, ~160 MiB
    of views), so it is parsed once per version of the file (path, size, mtime), the last one kept."""
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"GGUF file {p} not found")
    st = p.stat()
    return _open_reader(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_reader(path: str, size: int, mtime_ns: int):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("reading .gguf files needs the gguf package: pip install greta[models]") from None
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, IndexError, struct errors...
        raise GGUFError(f"GGUF file {path} is truncated or corrupted ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def gguf_field(reader, key: str, default=None, required: bool = False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise GGUFError(f"GGUF file lacks metadata key {key}")
        return default
    return f.contents()


def gguf_config(path) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata (and its tensor list: output.weight, rope_freqs), of a family
    engine.layout knows by its general.architecture (llama, qwen2)."""
    r = gguf_reader(path)
    arch = gguf_field(r, "general.architecture", required=True)
    family = family_of("gguf_arch", arch)
    if family is None:
        raise GGUFError(f"GGUF general.architecture {arch!r} is not supported: Greta runs "
                        f"{', '.join(lay.gguf_arch for lay in FAMILIES.values())} GGUF files only")
    a = f"{arch}."
    h = int(gguf_field(r, a + "embedding_length", required=True))
    n_heads = int(gguf_field(r, a + "attention.head_count", required=True))
    names = {t.name: t for t in r.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"GGUF file {path} lacks tensor token_embd.weight")
    vocab = gguf_field(r, a + "vocab_size")
    if vocab is None:
        vocab = int(names["token_embd.weight"].shape[-1])  # GGML order: (hidden, vocab)
    scaling = None
    kind = gguf_field(r, a + "rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(gguf_field(r, a + "rope.scaling.factor", required=True))}
    elif kind not in ("none", None):
        raise GGUFError(f"GGUF rope scaling type {kind!r} is not supported (supported: linear, and llama3 via rope_freqs)")
    if "rope_freqs.weight" in names:
        if scaling:
            raise GGUFError("GGUF file has both rope.scaling.type and rope_freqs.weight; refusing to guess")
        divisors = _tensor(names["rope_freqs.weight"], torch.float64, "cpu").reshape(-1).tolist()
        scaling = {"rope_type": "freq_factors", "factors": divisors}
    return ModelConfig(
        name=record_name(path), vocab_size=int(vocab), hidden_size=h,
        n_layers=int(gguf_field(r, a + "block_count", required=True)),
        n_heads=n_heads, n_kv_heads=int(gguf_field(r, a + "attention.head_count_kv", n_heads)),
        head_dim=int(gguf_field(r, a + "attention.key_length", 0) or gguf_field(r, a + "rope.dimension_count", 0) or h // n_heads),
        intermediate_size=int(gguf_field(r, a + "feed_forward_length", required=True)),
        rope_theta=float(gguf_field(r, a + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_eps=float(gguf_field(r, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        max_position_embeddings=int(gguf_field(r, a + "context_length", 131072)),
        family=family,
    )


def _tensor(t, dtype: torch.dtype, device) -> torch.Tensor:
    """A ReaderTensor as a torch tensor of its logical (row-major) shape, converted to dtype on device."""
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    try:
        data = np.array(t.data, copy=True)  # one tensor leaves the memory map at a time
    except Exception as e:  # noqa: BLE001 - a short file gives short or unreadable maps
        raise GGUFError(f"GGUF tensor {t.name} cannot be read: file truncated or corrupted ({e})") from None
    try:
        x = dequantize(t.tensor_type.name, torch.from_numpy(data.reshape(-1).view(np.uint8)))
    except UnknownTypeError:
        raise GGUFError(f"GGUF tensor {t.name} has type {t.tensor_type.name}; Greta loads {', '.join(KNOWN_TYPES)}") from None
    except ValueError as e:
        raise GGUFError(f"GGUF tensor {t.name}: {e}: file truncated or corrupted") from None
    if x.numel() != int(np.prod(shape)):
        raise GGUFError(f"GGUF tensor {t.name} holds {x.numel()} values, its shape {list(shape)} needs {int(np.prod(shape))}: "
                        "file truncated or corrupted")
    return x.reshape(shape).to(device=device, dtype=dtype)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf's permute): per head, rows
    [0, 2, 4, ... 1, 3, 5 ...] of the interleaved layout back to HF's two rotate-half halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permute (HF layout -> GGUF layout); the tests write GGUF files with it."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> logical (row-major) shape for a model of this config."""
    return expected_tensors(cfg, "gguf")


def load_gguf(path, cfg: ModelConfig, dtype: torch.dtype, device, slice_of=None) -> dict[str, torch.Tensor]:
    """Greta's weight dict from a GGUF file (names by the family's engine.layout); names and shapes checked
    first, each error one line.
    slice_of(role, shape) -> an index (None: all) keeps that part of each tensor (a tensor-parallel rank's
    shard: engine.tp). GGUF blocks quantize along rows, so a tensor is dequantized whole (one at a time, on
    the host) and cut before it moves to the device."""
    r = gguf_reader(path)
    tensors = {t.name: t for t in r.tensors}
    try:
        check_tensors(path, gguf_names(cfg), tensors, lambda k: tuple(int(x) for x in reversed(tensors[k].shape.tolist())),
                      lambda k: k == "rope_freqs.weight", what="GGUF file", source="its metadata",
                      model=f"a {layout_of(cfg).gguf_arch} of its metadata")
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    names = tensor_names(cfg, "gguf")
    permuted = layout_of(cfg).gguf_rope_permuted

    def get(role: str) -> torch.Tensor:
        t = _tensor(tensors[names[role]], dtype, "cpu" if slice_of else device)
        part = role.partition(".")[2]
        if permuted and part in ("q", "k"):  # permuted by llama.cpp's converter
            t = unpermute_rope_rows(t, cfg.n_heads if part == "q" else cfg.n_kv_heads)
        index = slice_of(role, tuple(t.shape)) if slice_of else None
        return (t if index is None else t[index]).to(device).contiguous()

    return assemble(cfg, get)
