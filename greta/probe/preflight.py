"""Machine checks before a probe starts its record: the files params name, and this machine.

    params = preflight(load_params(path, overrides))

greta.record.params decides whether params are well-formed (pure, no torch); this module decides whether
they can run here: the prompt files and tokenizer exist, the model is a preset or a readable checkpoint
(safetensors headers consistent with the file sizes, a .gguf with the GGUF magic), the device and backend
are available, and weights plus KV cache fit the device. Each problem is a ParamError of one line naming
the param and the fix, raised before anything is written.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from greta.probe.kinds import kind_of
from greta.record.params import Params, ParamError, check_tp_splits, is_file, show, dtype_bytes, resolve
from greta.terminal import brief


def preflight(params: Params) -> Params:
    """Check params against this machine; return them unchanged (so calls chain). Raises ParamError."""
    _check_tp_here(params)
    _check_threads(params.threads)
    _check_prompt(params)
    _check_model(params.model)
    if params.engine != "greta":
        _check_engine(params)
    if params.chat:  # after the model check: a model that is not there is named as that, not as a chat problem
        _check_chat(params)
    _check_device(params.device, params.dtype)
    if params.backend == "triton":
        _check_triton(params.device, params.dtype)
    _check_fits(params)
    return params


def device_memory(device: str) -> int:
    """Total bytes of a device: the host's RAM for cpu, the card's memory for cuda[:i]."""
    import psutil
    import torch

    if device == "cpu":
        return psutil.virtual_memory().total
    return torch.cuda.get_device_properties(int(device[5:] or 0)).total_memory


def _check_tp_here(p: Params) -> None:
    """Every kind runs tp > 1 as one worker per rank (greta.probe.ranks); on CUDA, rank r needs cuda:r."""
    if p.tp == 1:
        return
    if p.device == "cuda":
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < p.tp:
            raise ParamError(f"param tp={p.tp} needs {p.tp} GPUs (rank r on cuda:r) but {have} are visible; "
                             f"lower -p tp or run on a machine with {p.tp} GPUs")


def _check_threads(threads: int) -> None:
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise ParamError(f"param threads={threads} must be between 0 and {cpus} (0 = torch's default; at most this "
                         "machine's CPUs); e.g. -p threads=0")


def _check_prompt(p: Params) -> None:
    """The token-id file, text file and tokenizer the prompt params name exist and can be used."""
    if p.prompt not in ("synthetic", "hello"):
        _check_token_file(p.prompt, p.ctx)
    if p.prompt_file and not is_file(resolve(p.prompt_file)):
        raise ParamError(f"param prompt_file={show(p.prompt_file)}: no such text file")
    if p.tokenizer and not (is_file(Path(p.tokenizer)) or is_file(Path(p.tokenizer) / "tokenizer.json")):
        raise ParamError(f"param tokenizer={show(p.tokenizer)}: neither a tokenizer.json or .gguf file nor a directory holding "
                         "tokenizer.json")
    if p.prompt_file or p.prompt == "hello":
        from greta.engine.tokenize import find_tokenizer

        if find_tokenizer(p.model, p.tokenizer) is None:  # text without a tokenizer used to become synthetic ids
            key = f"prompt_file={show(p.prompt_file)}" if p.prompt_file else "prompt=hello"
            raise ParamError(f"param {key} is text but model={show(p.model)} has no tokenizer.json beside it nor a .gguf "
                             "tokenizer of its own; "
                             "pass -p tokenizer=<dir with tokenizer.json>, or use -p prompt=synthetic")


def _check_engine(p: Params) -> None:
    """A peer engine reads the model file itself (not Greta's synthetic presets) and is installed."""
    from greta.engine.peers import EngineMissing, require_engine
    from greta.engine.source import model_source

    source = model_source(p.model)
    if source == "synthetic":
        raise ParamError(f"param engine={p.engine} reads the model's own file, and model={show(p.model)} is one of Greta's "
                         "synthetic presets; use a .gguf file, a checkpoint directory or a real model (-p model=smollm2)")
    if p.engine == "llamacpp" and source != "gguf":
        raise ParamError(f"param engine=llamacpp reads a .gguf file and model={show(p.model)} is a checkpoint directory, "
                         "which llama.cpp cannot read; use a .gguf file or -p model=smollm2 (or convert it with "
                         "llama.cpp's convert_hf_to_gguf.py)")
    try:
        require_engine(p.engine)
    except EngineMissing as e:
        raise ParamError(f"param {e}") from None


def _check_chat(p: Params) -> None:
    """The chat message renders with the model's template and fits ctx (the same function the load phase runs:
    greta.engine.tokenize.chat_prompt), or one line saying why not."""
    from greta.engine.source import load_config
    from greta.engine.tokenize import chat_prompt

    try:
        chat_prompt(p.chat, p.model, p.tokenizer, p.ctx, load_config(p.model).vocab_size)
    except (ValueError, OSError) as e:
        text = brief(e)
        raise ParamError(text if text.startswith("param chat") else f"param chat: {text}") from None


def _check_token_file(prompt: str, ctx: int) -> None:
    if not is_file(Path(prompt)):
        raise ParamError(f"param prompt={show(prompt)}: not 'synthetic' or 'hello' and no such token-id file")
    from greta.engine.prompt import read_ids

    try:
        n = read_ids(prompt).size
    except (ValueError, OSError, UnicodeDecodeError) as e:
        why = show(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ParamError(f"param prompt={show(prompt)} is not a token-id file ({why}): "
                         "give integers separated by spaces, commas or newlines, or a .npy array") from None
    if n < ctx:
        raise ParamError(f"param prompt={show(prompt)} holds {n} token ids but ctx={ctx}: "
                         f"give a longer file or -p ctx={max(n, 1)}")


def _check_model(model: str) -> None:
    """The engine's own cheap check of the model source (greta.engine.source), as a ParamError."""
    from greta.engine.source import ModelSourceError, check_model

    try:
        check_model(model)
    except ModelSourceError as e:
        raise ParamError(brief(f"param {e}")) from None
    except (ValueError, OSError) as e:
        raise ParamError(f"param model={show(model)}: {brief(e)}") from None


def _check_device(device: str, dtype: str) -> None:
    import torch

    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ParamError(f"param device={device!r} but no GPU is visible to torch (torch {torch.__version__}); use -p device=cpu")
    idx = int(device[5:]) if ":" in device else 0
    if idx >= torch.cuda.device_count():
        raise ParamError(f"param device={device!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ParamError(f"param dtype=bfloat16 is not supported on {torch.cuda.get_device_name(idx)}; use -p dtype=float16")


def _check_triton(device: str, dtype: str) -> None:
    if importlib.util.find_spec("triton") is None:
        raise ParamError("param backend=triton but triton is not installed; pip install triton, or use -p backend=torch")
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ParamError("param backend=triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter); or use -p backend=torch")
        if dtype == "bfloat16":
            raise ParamError("param backend=triton on the CPU: the interpreter computes bf16 tl.dot wrongly; use -p dtype=float32")


def _check_fits(p: Params) -> None:
    """Refuse a run whose weights plus KV cache alone (one rank's: its shard, its KV heads; a slab per sequence
    the kind holds) exceed the device's total memory."""
    from greta.engine.config import cache_tokens, kv_bytes
    from greta.engine.source import load_config, model_source

    try:
        cfg = load_config(p.model)
    except Exception as e:  # noqa: BLE001 - a config.json that isn't a Llama config, GGUF metadata gguf can't read
        what = "GGUF metadata" if model_source(p.model) == "gguf" else "config.json"
        raise ParamError(f"param model={show(p.model)}: cannot read its {what} ({' '.join(str(e).split())[:80]})") from None
    check_tp_splits(p, cfg)
    if p.tp_invariant:
        from greta.engine.config import check_tree, tree_segments

        try:
            check_tree(cfg, tree_segments(cfg), p.tp)
        except ValueError as e:
            raise ParamError(f"param tp_invariant=1 with model {show(p.model)}: {e}") from None
    b, slabs = dtype_bytes(p.dtype), kind_of(p).kv_sequences(p)
    weights = cfg.rank_param_count(p.tp) * b  # one rank's, as are its KV heads
    kv = kv_bytes(cfg, slabs, cache_tokens(p.ctx + p.gen, p.prefill_chunk), p.kv_block, b, heads=cfg.n_kv_heads // p.tp)
    have = device_memory(p.device)
    kind_of(p).preflight(p, cfg, have)
    if weights + kv > have:
        sizes = ", ".join(f"{k}={getattr(p, k)}" for k in ("ctx", "gen", "prefill_chunk", "kv_block", "tp"))
        held = f"KV cache of {slabs} slabs (a request each)" if slabs > 1 else "KV cache"
        raise ParamError(f"params {sizes}{f', batch={slabs}' if slabs > 1 else ''}: weights {weights / 2**30:.3g} GiB "
                         f"+ {held} {kv / 2**30:.3g} GiB do not fit the {have / 2**30:.3g} GiB of {p.device}; "
                         f"{'lower -p batch or -p ctx' if slabs > 1 else 'lower -p ctx'} (or gen, prefill_chunk, "
                         "kv_block), or raise -p tp")

