"""Model weights: seeded synthetic init with the real shapes, or a local HF checkpoint (safetensors;
GGUF files: greta/engine/gguf.py), both laid out by the model family's engine.layout.

Internal names (fused where both paths always multiply together; the layout's `fused`):
  embed, lm_head, norm, and per layer i: i.attn_norm, i.wqkv (q;k;v rows), i.wo, i.mlp_norm, i.w13 (gate;up rows),
  i.w2, and where the family has them i.bqkv (q;k;v biases)
Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path
from typing import Callable, Collection

import torch

from greta.engine.config import ModelConfig
from greta.engine.layout import fused_shape, layout_of, part_rows, role_shape, weight_names


BIAS_STD = 0.5  # a synthetic bias moves q/k/v by half their unit RMS: a model run without it differs plainly


def _init_std(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> float | None:
    """The synthetic init's std of Greta's weight `name` (None: a norm, all ones)."""
    lay = layout_of(cfg)
    kind = lay.tensor(lay.parts(name)[0]).kind
    if kind != "weight":
        return {"embed": 1.0, "bias": BIAS_STD, "norm": None}[kind]
    resid = 1.0 / math.sqrt(2 * cfg.n_layers) if name.rpartition(".")[2] in lay.residual_writers else 1
    return resid / math.sqrt(shape[1])


def synthetic(cfg: ModelConfig, seed: int, dtype: torch.dtype, device,
              transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Gaussian weights of the family's layout (engine.layout), deterministic per (seed, tensor name, device type).

    transform(name, full) -> what to keep of each tensor, applied as soon as it is drawn so the full one can
    be freed (tensor parallelism keeps this rank's shard: greta.engine.tp.synthetic_shard).

    Scales keep 32 layers at 32k context finite and not degenerate: inputs to each matmul have unit RMS
    (RMSNorm), so W ~ N(0, 1/fan_in) keeps outputs near unit RMS; the two projections that write the
    residual stream (wo, w2) are further scaled by 1/sqrt(2 * n_layers), so the stream grows slowly; the
    embedding is N(0, 1), so each position's logits depend strongly on its own token and argmaxes vary.
    Norms are ones; biases N(0, BIAS_STD^2). A tied lm_head is the embedding.
    """
    keep = transform or (lambda name, t: t)
    w, ones = {}, []
    gen = torch.Generator(device=device)
    for name in weight_names(cfg):
        shape = fused_shape(cfg, name)
        std = _init_std(cfg, name, shape)
        if std is None:
            ones.append(name)
        elif not (name == "lm_head" and cfg.tie_embeddings):
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            w[name] = keep(name, torch.randn(shape, generator=gen, dtype=dtype, device=device).mul_(std))
    for name in ones:
        w[name] = torch.ones(fused_shape(cfg, name), dtype=dtype, device=device)
    if cfg.tie_embeddings:
        w["lm_head"] = keep("lm_head", w["embed"])
    return w


def synthetic_hash(cfg: ModelConfig, seed: int) -> str:
    config = cfg.to_dict()
    if config["family"] == "llama":  # the hash a Llama preset had before families existed: its weights are those
        del config["family"]
    blob = json.dumps({"config": config, "seed": seed, "init": "greta-synthetic-v1"}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


# --- HF checkpoints -------------------------------------------------------------------------
# Each file format spells the same tensors its own way (engine.layout: a Tensor's hf and gguf names). Roles:
# embed, norm, lm_head (untied configs only), and per layer i "{i}.<role>" for each of the layout's layer roles.
FORMATS = ("hf", "gguf")


def role_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """role -> shape of every tensor a checkpoint of this config holds."""
    lay = layout_of(cfg)
    out = {r: role_shape(cfg, r) for r in lay.top if r != "lm_head" or not cfg.tie_embeddings}
    for i in range(cfg.n_layers):
        out.update({f"{i}.{r}": role_shape(cfg, r) for r in lay.layer})
    return out


def tensor_names(cfg: ModelConfig, fmt: str = "hf") -> dict[str, str]:
    """role -> the tensor's name in a file of that format (hf, gguf), for every tensor of this config."""
    lay = layout_of(cfg)
    prefix = {"hf": lay.hf_layer_prefix, "gguf": lay.gguf_layer_prefix}[fmt]
    out = {}
    for role in role_shapes(cfg):
        i, _, part = role.partition(".")
        out[role] = getattr(lay.tensor(role), fmt) if not part else prefix.format(i) + getattr(lay.tensor(part), fmt)
    return out


def assemble(cfg: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Greta's weight dict from get(role), fusing each of the layout's groups (q;k;v, gate;up, ...) layer by
    layer; a tied lm_head is embed."""
    lay = layout_of(cfg)
    w = {r: get(r) for r in lay.top if r != "lm_head" or not cfg.tie_embeddings}
    for i in range(cfg.n_layers):
        for name, parts in lay.fused.items():
            ts = [get(f"{i}.{x}") for x in parts]
            w[f"{i}.{name}"] = ts[0] if len(ts) == 1 else torch.cat(ts)
    if cfg.tie_embeddings:
        w["lm_head"] = w["embed"]
    return w


def disassemble(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """role -> tensor: assemble's inverse (each fused weight split back into its parts)."""
    lay = layout_of(cfg)
    out = {r: w[r] for r in lay.top if r != "lm_head" or not cfg.tie_embeddings}
    for i in range(cfg.n_layers):
        for name, parts in lay.fused.items():
            t = w[f"{i}.{name}"]
            out.update(zip((f"{i}.{x}" for x in parts), t.split(part_rows(cfg, f"{i}.{name}"))))
    return out


class CheckpointError(ValueError):
    """A checkpoint that can't be loaded: one line naming the file or tensor at fault."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs is not there."""


class CheckpointTensorMissing(CheckpointError, KeyError):
    """A tensor the config implies is in no file (str() is the plain message, not KeyError's repr)."""


# tensors some HF checkpoints carry that Greta doesn't use (older transformers saved the rope buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_tensors(cfg: ModelConfig, fmt: str = "hf") -> dict[str, tuple[int, ...]]:
    """Tensor name (as that format writes it; default HF's) -> shape, for every tensor a checkpoint of this
    config must hold."""
    shapes = role_shapes(cfg)
    return {name: shapes[role] for role, name in tensor_names(cfg, fmt).items()}


def _some(names: list[str]) -> str:
    """The first three names, and how many more."""
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def check_tensors(path, want: dict[str, tuple[int, ...]], have: Collection[str],
                  shape_of: Callable[[str], tuple[int, ...]], ignore: Callable[[str], bool] = lambda k: False, *,
                  what: str = "checkpoint", source: str = "config.json",
                  model: str = "the model of this config.json") -> None:
    """A file's tensor names (have; shape_of(name) gives one's shape) against want (name -> shape), before any
    data is read; names as the file spells them. Raises CheckpointTensorMissing naming missing tensors, else
    CheckpointError naming unexpected ones (but those ignore(name) accepts), else the first misshapen one."""
    missing = [k for k in want if k not in have]
    if missing:
        raise CheckpointTensorMissing(f"{what} {path} lacks tensor(s) {_some(missing)}")
    extra = sorted(k for k in have if k not in want and not ignore(k))
    if extra:
        raise CheckpointError(f"{what} {path} has unexpected tensor(s) {_some(extra)} for {model}")
    for k, shape in want.items():
        got = tuple(shape_of(k))
        if got != shape:
            raise CheckpointError(f"{what} {path}: tensor {k} has shape {list(got)}, {source} implies {list(shape)}")


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


SAFETENSORS_HEADER_MAX = 100 << 20  # safetensors' own limit on the JSON header


def check_safetensors_header(f: Path) -> None:
    """Cheap check of a .safetensors file before loading it: the 8-byte header length, the JSON header, and
    a file size equal to the header's end plus its largest data offset (a truncated download fails here)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
        if not 0 < n <= min(SAFETENSORS_HEADER_MAX, size - 8):
            raise CheckpointError(f"{f} is not a safetensors file (header length {n} does not fit its {size} bytes); "
                                  "download it again")
        try:
            header = json.loads(fh.read(n))
            end = max([0] + [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{f} has an unreadable safetensors header ({type(e).__name__}); download it again") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{f} is {size} bytes but its safetensors header says {8 + n + end} "
                              f"({'truncated' if size < 8 + n + end else 'trailing bytes'}); download it again")


def check_checkpoint_headers(path) -> list[Path]:
    """checkpoint_files(path), each with a sound safetensors header. Raises CheckpointError (one line)."""
    files = checkpoint_files(path)
    for f in files:
        check_safetensors_header(f)
    return files


SliceOf = Callable[[str, tuple], "tuple[slice, ...] | None"]


def load_checkpoint(path, cfg: ModelConfig, dtype: torch.dtype, device,
                    slice_of: SliceOf | None = None) -> dict[str, torch.Tensor]:
    """Load a local HF checkpoint of a family engine.layout knows (config.json + model.safetensors, or shards +
    index.json).

    Files are memory-mapped (safetensors' safe_open) and tensors are taken one at a time, converted to
    dtype on the target device and fused (q;k;v, gate;up) layer by layer, so the host never holds a second
    full copy of the weights. Names and shapes are checked against the config before any data is read:
    missing, extra and misshapen tensors are each named in a one-line CheckpointError. slice_of(role, shape)
    -> an index (None: all) reads only that part of each tensor (a tensor-parallel rank's shard: engine.tp).
    """
    from contextlib import ExitStack

    files = checkpoint_files(path)
    dev = str(device)
    with ExitStack() as stack:
        where: dict[str, object] = {}
        for f in files:
            sf = _safe_open(f, dev, stack)
            for k in sf.keys():
                where[k] = (sf, f)
        check_tensors(path, expected_tensors(cfg), where, lambda k: where[k][0].get_slice(k).get_shape(),
                      lambda k: k.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and k == "lm_head.weight"),
                      model=f"a {layout_of(cfg).hf_architecture} of this config.json")
        names = tensor_names(cfg)

        def get(role: str) -> torch.Tensor:
            k = names[role]
            sf, f = where[k]
            try:
                index = slice_of(role, tuple(sf.get_slice(k).get_shape())) if slice_of else None
                t = sf.get_tensor(k) if index is None else sf.get_slice(k)[index]
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"safetensors file {f} is truncated or corrupted at tensor {k} "
                                      f"({' '.join(str(e).split())[:160]})") from None
            return t.to(device=dev, dtype=dtype)  # a slice may come back on the host

        return assemble(cfg, get)


def save_checkpoint(w: dict[str, torch.Tensor], cfg: ModelConfig, path) -> Path:
    """Write weights as an HF-style checkpoint directory (used by tests; unfuses wqkv and w13)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    names = tensor_names(cfg)
    out = {names[role]: t.contiguous().cpu() for role, t in disassemble(cfg, w).items()}
    save_file(out, str(path / "model.safetensors"))
    return path


def checkpoint_hash(path) -> str:
    """sha256 over config.json and the checkpoint's safetensors files' bytes (checkpoint_files); of a .gguf
    file, over its bytes."""
    h = hashlib.sha256()
    files = [Path(path)] if Path(path).is_file() else [Path(path) / "config.json", *checkpoint_files(path)]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()
