"""Probe params: a YAML file plus `key=value` overrides, validated before anything runs.

Every problem is a ParamError with one line that names the key and the fix.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

PHASES = ("ceilings", "load", "prefill", "decode", "reference")
FAULT_KINDS = ("hang", "oom", "crash", "kill", "error", "kernel_death")

DEFAULTS: dict = {
    "probe": "b3_77",
    "model": "tiny",            # preset name, a local HF checkpoint directory, or a Llama .gguf file
    "device": "cpu",            # cpu | cuda | cuda:N (ROCm devices are cuda too)
    "backend": "torch",         # torch (reference, runs anywhere) | triton (kernels/, kv_aligned=1 only)
    "dtype": "bfloat16",        # bfloat16 | float16 | float32
    "ctx": 4096,
    "gen": 64,
    "span": 16,
    "kv_aligned": 1,
    "seed": 0,
    "prompt": "synthetic",      # synthetic, hello ('hello ' x ctx, tokenized), or a file of token ids (whitespace/comma separated, or .npy)
    "prompt_file": "",          # a UTF-8 text file to tokenize as the prompt (needs a tokenizer.json; see greta/tokenize.py)
    "tokenizer": "",            # tokenizer.json (or its directory) for text prompts; default: the one beside the model
    "prefill_chunk": 256,       # rows per prefill chunk; with kv_aligned=1 also the fixed row tile
    "kv_block": 1024,           # KV block (keys) walked by aligned attention; cache is padded to it
    "timeouts": {"ceilings": 300.0, "load": 600.0, "prefill": 600.0, "decode": 600.0, "reference": 600.0},
    "sampling_period_s": 1.0,
    "thresholds": {"max_abs_diff": 5e-3, "p99_abs_diff": 1e-3, "top1_agreement": 0.999},
    "perturb": "none",          # negative control on the decode path: none | rope_offset | kv_off_by_one
    "fault": "none",            # fault injection (tests): none | <hang|oom|crash|kill|error|kernel_death>:<phase>
    "threads": 0,               # CPU threads for torch (0 = torch's default)
}

CHOICES = {
    "probe": ("b3_77",),
    "backend": ("torch", "triton"),
    "dtype": ("bfloat16", "float16", "float32"),
    "kv_aligned": (0, 1),
    "perturb": ("none", "rope_offset", "kv_off_by_one"),
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a params dtype."""
    return 4 if dtype == "float32" else 2


class ParamError(ValueError):
    """A bad param: the message is one line naming the problem and the fix."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set(d: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for p in parents:
        d = d[p]
    d[last] = value


def _coerce(key: str, value, default):
    """Bring a value (from YAML, a CLI string or papermill) to the default's type."""
    want = type(default)
    if isinstance(value, str) and want is not str:
        try:
            value = float(value) if want is float else yaml.safe_load(value)  # YAML 1.1 reads "1e-3" as a string
        except (ValueError, yaml.YAMLError):
            pass
    if isinstance(value, str) and want is float:
        try:
            value = float(value)  # "5e-3" from a YAML file
        except ValueError:
            pass
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ParamError(f"param {key}={value!r} has type {type(value).__name__}; expected {want.__name__}")
    return value


def resolve(path) -> Path:
    """A relative path as given, else relative to the repository checkout (for notebooks run elsewhere)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    repo = Path(__file__).resolve().parent.parent / p
    return repo if repo.exists() else p


def parse_overrides(items: list[str]) -> dict:
    """['ctx=32768', 'timeouts.decode=5'] -> {'ctx': '32768', ...}"""
    out = {}
    for it in items:
        if "=" not in it:
            raise ParamError(f"override {it!r} is not key=value; write e.g. -p ctx=32768")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_params(path=None, overrides: dict | None = None) -> dict:
    """Defaults <- YAML file <- overrides (dotted keys allowed), then validate. Returns a plain dict."""
    params = copy.deepcopy(DEFAULTS)
    known = _flat(DEFAULTS)
    layers = []
    if path:
        p = resolve(path)
        if not p.is_file():
            raise ParamError(f"params file {path} not found; pass one of {sorted(str(x) for x in Path('params').glob('*.yaml'))}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParamError(f"params file {path} is not valid YAML ({' '.join(str(e).split())[:120]})") from None
        if not isinstance(data, dict):
            raise ParamError(f"params file {path} must be a mapping of key: value")
        layers.append((str(path), _flat(data)))
    layers.append(("override", _flat(dict(overrides or {}))))
    for source, flat in layers:
        for key, value in flat.items():
            if key not in known:
                raise ParamError(f"unknown param {key!r} (from {source}); known: {', '.join(sorted(known))}")
            _set(params, key, _coerce(key, value, known[key]))
    validate(params)
    return params


def validate(p: dict) -> None:
    for key, allowed in CHOICES.items():
        if p[key] not in allowed:
            raise ParamError(f"param {key}={p[key]!r} is not one of {list(allowed)}")
    if p["ctx"] <= 0:
        raise ParamError(f"param ctx={p['ctx']} must be > 0")
    if p["gen"] <= 0:
        raise ParamError(f"param gen={p['gen']} must be > 0")
    if not 1 <= p["span"] <= p["gen"]:
        raise ParamError(f"param span={p['span']} must be between 1 and gen={p['gen']}")
    for key in ("prefill_chunk", "kv_block"):
        if p[key] <= 0:
            raise ParamError(f"param {key}={p[key]} must be > 0")
    if p["sampling_period_s"] <= 0:
        raise ParamError(f"param sampling_period_s={p['sampling_period_s']} must be > 0")
    if p["threads"] < 0:
        raise ParamError(f"param threads={p['threads']} must be >= 0 (0 = torch's default)")
    for ph, t in p["timeouts"].items():
        if t <= 0:
            raise ParamError(f"param timeouts.{ph}={t} must be > 0 seconds")
    for k, v in p["thresholds"].items():
        if v < 0 or (k == "top1_agreement" and v > 1):
            raise ParamError(f"param thresholds.{k}={v} is out of range")
    f = p["fault"]
    if f != "none":
        kind, _, phase = f.partition(":")
        if kind not in FAULT_KINDS or phase not in PHASES:
            raise ParamError(f"param fault={f!r}: write none or <{'|'.join(FAULT_KINDS)}>:<{'|'.join(PHASES)}>, e.g. hang:decode")
    if p["prompt"] not in ("synthetic", "hello") and not Path(p["prompt"]).is_file():
        raise ParamError(f"param prompt={p['prompt']!r}: not 'synthetic' or 'hello' and no such token-id file")
    if p["prompt_file"] and not resolve(p["prompt_file"]).is_file():
        raise ParamError(f"param prompt_file={p['prompt_file']!r}: no such text file")
    if p["tokenizer"] and not (Path(p["tokenizer"]).is_file() or (Path(p["tokenizer"]) / "tokenizer.json").is_file()):
        raise ParamError(f"param tokenizer={p['tokenizer']!r}: neither a tokenizer.json file nor a directory holding one")
    _check_model(p["model"])
    _check_device(p["device"], p["dtype"])
    if p["backend"] == "triton":
        _check_triton(p["device"], p["dtype"])


def _check_triton(device: str, dtype: str) -> None:
    import os

    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise ParamError("param backend=triton but triton is not installed; pip install triton, or use -p backend=torch")
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ParamError("param backend=triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter); or use -p backend=torch")
        if dtype == "bfloat16":
            raise ParamError("param backend=triton on the CPU: the interpreter computes bf16 tl.dot wrongly; use -p dtype=float32")


def _check_model(model: str) -> None:
    from .config import PRESETS

    if model in PRESETS:
        return
    if model.endswith(".gguf"):
        if not Path(model).is_file():
            raise ParamError(f"param model={model!r}: no such GGUF file")
        return
    d = Path(model)
    if not (d / "config.json").is_file():
        raise ParamError(f"param model={model!r} is neither a preset ({', '.join(PRESETS)}), a checkpoint directory with config.json, nor a .gguf file")
    if not any(d.glob("*.safetensors")):
        raise ParamError(f"param model={model!r}: checkpoint directory has config.json but no *.safetensors")


def _check_device(device: str, dtype: str) -> None:
    import torch

    if device == "cpu":
        return
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ParamError(f"param device={device!r}: use cpu, cuda or cuda:N (ROCm GPUs are cuda too)")
    if not torch.cuda.is_available():
        raise ParamError(f"param device={device!r} but no GPU is visible to torch (torch {torch.__version__}); use -p device=cpu")
    idx = int(device[5:]) if ":" in device else 0
    if idx >= torch.cuda.device_count():
        raise ParamError(f"param device={device!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ParamError(f"param dtype=bfloat16 is not supported on {torch.cuda.get_device_name(idx)}; use -p dtype=float16")
