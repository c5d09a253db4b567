"""Probe params: a YAML file plus `key=value` overrides, validated before anything runs.

Every problem is a ParamError with one line that names the key and the fix.
"""
from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import yaml

from greta.paths import resolve

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
    "memory_fraction": 1.0,     # GPU: cap the worker's allocator at this fraction of the card (a real OOM on purpose)
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


SECTIONS = tuple(k for k, v in DEFAULTS.items() if isinstance(v, dict))  # timeouts, thresholds
SIZE_MAX = 2**31 - 1      # ctx, gen, prefill_chunk, kv_block: far past any model; keeps _check_fits in float range
SEED_MAX = 2**32 - 1      # weights.synthetic seeds torch generators with seed * 1_000_003 + crc32
TIMEOUT_MAX_S = 7 * 86400.0
SAMPLING_MAX_S = 3600.0


class ParamError(ValueError):
    """A bad param: the message is one line naming the problem and the fix."""


def _show(value, limit: int = 60) -> str:
    """repr(value) on one line, cut to about limit characters (CLI values and YAML junk can be huge)."""
    try:
        r = repr(value)
    except ValueError:  # an int too long for str() (sys.get_int_max_str_digits)
        return f"<int of {value.bit_length()} bits>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _flat(d: dict, source: str) -> dict:
    """{'timeouts': {'decode': 5}, 'ctx': 1} -> {'timeouts.decode': 5, 'ctx': 1}. Only the sections of
    DEFAULTS nest; any other dict stays a value (and is refused as the wrong type)."""
    out = {}
    for k, v in d.items():
        k = k if isinstance(k, str) else _show(k)
        if k in SECTIONS and isinstance(v, dict):
            items = {f"{k}.{sk}": sv for sk, sv in v.items()}
        elif k in SECTIONS:
            raise ParamError(f"param {k}={_show(v)} (from {source}) must be a mapping, e.g. -p {k}.{next(iter(DEFAULTS[k]))}=...")
        else:
            items = {k: v}
        for fk, fv in items.items():
            if fk in out:
                raise ParamError(f"param {fk} is given twice (from {source}); keep one")
            out[fk] = fv
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
        try:
            value = float(value)
        except OverflowError:  # an int past float range: as non-finite as inf
            value = math.inf if value > 0 else -math.inf
    if want is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ParamError(f"param {key}={_show(value)} has type {type(value).__name__}; expected {want.__name__}, "
                         f"e.g. -p {key}={_flat_defaults()[key]}")
    if want is float and not math.isfinite(value):
        raise ParamError(f"param {key}={value} is not a finite number; e.g. -p {key}={_flat_defaults()[key]}")
    return value


def _flat_defaults() -> dict:
    return _flat(DEFAULTS, "defaults")


def parse_overrides(items: list[str]) -> dict:
    """['ctx=32768', 'timeouts.decode=5'] -> {'ctx': '32768', ...}"""
    out = {}
    for it in items:
        if "=" not in it:
            raise ParamError(f"override {_show(it)} is not key=value; write e.g. -p ctx=32768")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                break
            if dup:
                raise ParamError(f"duplicate key {_show(key)} (line {key_node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep)


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # name too long, embedded NUL, ...
        return False


def _read_yaml(path) -> dict:
    """The params file as a dict; every problem with it is a one-line ParamError naming the file."""
    name = _show(str(path), 120)
    p = resolve(path)
    if not _is_file(p):
        raise ParamError(f"params file {name} not found; pass one of {sorted(str(x) for x in Path('params').glob('*.yaml'))}")
    try:
        text = p.read_bytes().decode("utf-8-sig")
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ParamError as e:
        raise ParamError(f"params file {name}: {e}") from None
    except UnicodeDecodeError:
        raise ParamError(f"params file {name} is not UTF-8 text; write key: value lines") from None
    except RecursionError:
        raise ParamError(f"params file {name} nests too deeply; write flat key: value lines") from None
    except OSError as e:
        raise ParamError(f"params file {name} cannot be read ({e.strerror})") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an int longer than Python will parse
        raise ParamError(f"params file {name} is not valid YAML ({_show(' '.join(str(e).split()), 120)})") from None
    if data is None:  # empty, or only comments
        return {}
    if not isinstance(data, dict):
        raise ParamError(f"params file {name} must be a mapping of key: value (got {type(data).__name__})")
    return data


def load_params(path=None, overrides: dict | None = None) -> dict:
    """Defaults <- YAML file <- overrides (dotted keys allowed), then validate. Returns a plain dict."""
    params = copy.deepcopy(DEFAULTS)
    known = _flat_defaults()
    layers = []
    if path is not None:
        layers.append((_show(str(path), 120), _flat(_read_yaml(path), _show(str(path), 120))))
    if overrides is not None and not isinstance(overrides, dict):
        raise ParamError(f"overrides must be a dict of key: value (got {type(overrides).__name__})")
    layers.append(("override", _flat(dict(overrides or {}), "override")))
    for source, flat in layers:
        for key, value in flat.items():
            if key not in known:
                raise ParamError(f"unknown param {_show(key)} (from {source}); known: {', '.join(sorted(known))}")
            _set(params, key, _coerce(key, value, known[key]))
    validate(params)
    return params


def _range(p: dict, key: str, lo, hi=None, why: str = "") -> None:
    """Refuse p[key] (a dotted key reads a section) outside lo..hi, naming the key and a default to use."""
    *sec, last = key.split(".")
    v = (p[sec[0]] if sec else p)[last]
    if v < lo or (hi is not None and v > hi):
        g = (lambda x: f"{x:g}" if isinstance(x, float) else str(x))
        want = f"between {g(lo)} and {g(hi)}" if hi is not None else f">= {g(lo)}"
        raise ParamError(f"param {key}={_show(v)} must be {want}{why}; e.g. -p {key}={_flat_defaults()[key]}")


def validate(p: dict) -> None:
    for key, allowed in CHOICES.items():
        if p[key] not in allowed:
            raise ParamError(f"param {key}={_show(p[key])} is not one of {list(allowed)}")
    for key in ("ctx", "gen", "prefill_chunk", "kv_block"):
        _range(p, key, 1, SIZE_MAX)
    if not 1 <= p["span"] <= p["gen"]:
        raise ParamError(f"param span={_show(p['span'])} must be between 1 and gen={_show(p['gen'])}; lower -p span or raise -p gen")
    _range(p, "seed", 0, SEED_MAX)
    _range(p, "threads", 0, os.cpu_count() or 1, " (0 = torch's default; at most this machine's CPUs)")
    _range(p, "sampling_period_s", 1e-3, SAMPLING_MAX_S, " seconds")
    _range(p, "memory_fraction", 0.01, 1.0, " (of the GPU's memory)")
    if p["memory_fraction"] < 1.0 and not p["device"].startswith("cuda"):
        raise ParamError(f"param memory_fraction={_show(p['memory_fraction'])} caps a GPU's allocator; on "
                         f"device={_show(p['device'])} leave it at 1.0")
    for ph in p["timeouts"]:
        _range(p, f"timeouts.{ph}", 1e-3, TIMEOUT_MAX_S, " seconds")
    for k in p["thresholds"]:
        _range(p, f"thresholds.{k}", 0.0, 1.0 if k == "top1_agreement" else None)
    f = p["fault"]
    if f != "none":
        kind, _, phase = f.partition(":")
        if kind not in FAULT_KINDS or phase not in PHASES:
            raise ParamError(f"param fault={_show(f)}: write none or <{'|'.join(FAULT_KINDS)}>:<{'|'.join(PHASES)}>, e.g. hang:decode")
    if p["prompt"] not in ("synthetic", "hello"):
        if not _is_file(Path(p["prompt"])):
            raise ParamError(f"param prompt={_show(p['prompt'])}: not 'synthetic' or 'hello' and no such token-id file")
        from greta.engine.prompt import read_ids

        try:
            n = read_ids(p["prompt"]).size
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise ParamError(f"param prompt={_show(p['prompt'])} is not a token-id file ({_show(str(e).splitlines()[0] if str(e) else type(e).__name__)}): "
                             "give integers separated by spaces, commas or newlines, or a .npy array") from None
        if n < p["ctx"]:
            raise ParamError(f"param prompt={_show(p['prompt'])} holds {n} token ids but ctx={p['ctx']}: "
                             f"give a longer file or -p ctx={max(n, 1)}")
    if p["prompt_file"] and not _is_file(resolve(p["prompt_file"])):
        raise ParamError(f"param prompt_file={_show(p['prompt_file'])}: no such text file")
    if p["tokenizer"] and not (_is_file(Path(p["tokenizer"])) or _is_file(Path(p["tokenizer"]) / "tokenizer.json")):
        raise ParamError(f"param tokenizer={_show(p['tokenizer'])}: neither a tokenizer.json file nor a directory holding one")
    _check_model(p["model"])
    _check_device(p["device"], p["dtype"])
    if p["backend"] == "triton":
        _check_triton(p["device"], p["dtype"])
    _check_fits(p)


def device_memory(device: str) -> int:
    """Total bytes of a device: the host's RAM for cpu, the card's memory for cuda[:i]."""
    import psutil
    import torch

    if device == "cpu":
        return psutil.virtual_memory().total
    return torch.cuda.get_device_properties(int(device[5:] or 0)).total_memory


def _check_fits(p: dict) -> None:
    """Refuse a run whose weights plus KV cache alone exceed the device's total memory."""
    from greta.engine.config import kv_capacity
    from greta.engine.source import load_config

    try:
        cfg = load_config(p["model"])
    except Exception as e:  # a checkpoint's config.json that isn't a Llama config
        raise ParamError(f"param model={_show(p['model'])}: cannot read its config.json ({_show(str(e), 80)})") from None
    cache = kv_capacity(p["ctx"] + p["gen"] + p["prefill_chunk"], p["kv_block"])  # as runner.KVCache holds it
    b = dtype_bytes(p["dtype"])
    need = cfg.param_count() * b + cfg.kv_bytes_per_token(b) * cache
    have = device_memory(p["device"])
    if need > have:
        sizes = ", ".join(f"{k}={_show(p[k], 24)}" for k in ("ctx", "gen", "prefill_chunk", "kv_block"))
        raise ParamError(f"params {sizes}: weights + KV cache need {need / 2**30:.3g} GiB but {p['device']} has "
                         f"{have / 2**30:.3g} GiB; lower -p ctx (or gen, prefill_chunk, kv_block)")


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
    from greta.engine.source import check_model

    try:
        check_model(model)
    except ValueError as e:  # ModelSourceError (its reason), CheckpointError: one line naming the fault
        raise ParamError(f"param model={_show(model)}: {getattr(e, 'reason', e)}") from None


def _check_device(device: str, dtype: str) -> None:
    import torch

    if device == "cpu":
        return
    if not re.fullmatch(r"cuda(:[0-9]+)?", device):
        raise ParamError(f"param device={_show(device)}: use cpu, cuda or cuda:N (ROCm GPUs are cuda too)")
    if not torch.cuda.is_available():
        raise ParamError(f"param device={device!r} but no GPU is visible to torch (torch {torch.__version__}); use -p device=cpu")
    idx = int(device[5:]) if ":" in device else 0
    if idx >= torch.cuda.device_count():
        raise ParamError(f"param device={device!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ParamError(f"param dtype=bfloat16 is not supported on {torch.cuda.get_device_name(idx)}; use -p dtype=float16")
