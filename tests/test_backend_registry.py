"""The backend registry (greta/engine/backends.py) is the one place a backend is chosen, its batch wrapper
found and its CUDA-graph capability read; the `backend` param's choices come from it."""
from __future__ import annotations

import pytest
import torch

from greta.engine.ops import graphable, make_ops, with_control
from greta.engine.ops.batch import batch_ops
from greta.engine.backends import BACKENDS, PARAM_BACKENDS, backend_of, choose
from greta.record.params import CHOICES


def _tables(device="cpu"):
    return torch.zeros(8, 4, device=device), torch.ones(8, 4, device=device)


def test_the_param_choices_are_the_registry_s():
    assert CHOICES["backend"] == PARAM_BACKENDS == ("torch", "triton")


@pytest.mark.parametrize("param,kv,want", [("torch", 1, "tiled_torch"), ("triton", 1, "triton"),
                                           ("torch", 0, "torch"), ("triton", 0, "torch")])
def test_choose_on_the_cpu(param, kv, want):
    assert choose(param, kv, on_cuda=False).name == want


def test_kv_aligned_0_on_cuda_is_the_fast_path(monkeypatch):
    from greta.engine import backends as registry

    monkeypatch.setattr(registry, "_has_triton", lambda: True)
    assert choose("triton", 0, on_cuda=True).name == "cuda_fast"
    monkeypatch.setattr(registry, "_has_triton", lambda: False)
    assert choose("triton", 0, on_cuda=True).name == "torch"  # no Triton: plain torch on CUDA too


def test_an_unknown_backend_is_one_line():
    with pytest.raises(ValueError) as e:
        choose("cudnn", 1, on_cuda=False)
    assert "torch, triton" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("param,kv", [("torch", 1), ("triton", 1), ("torch", 0)])
def test_make_ops_builds_the_chosen_backend_and_its_batch_wrapper(param, kv):
    cos, sin = _tables()
    ops = make_ops(param, kv, cos, sin, chunk=64, kv_block=64)
    entry = choose(param, kv, on_cuda=False)
    assert type(ops) is entry.ops_class() and backend_of(ops) is entry
    wrapped = with_control(ops, "rope_offset")  # a control wraps it: still the same backend underneath
    assert backend_of(wrapped) is entry
    assert type(batch_ops(ops)) is entry.batch_class()
    assert not graphable(ops, torch.device("cpu"))  # never on the CPU


def test_capabilities_are_declared_not_guessed():
    by = {b.name: b for b in BACKENDS}
    assert {n for n, b in by.items() if b.exact} == {"triton", "tiled_torch"}
    assert {n for n, b in by.items() if b.graphable} == {"triton", "cuda_fast"}
    assert [n for n, b in by.items() if b.needs_cuda] == ["cuda_fast"]
    for b in BACKENDS:  # every entry names real classes (Triton is installed with the test extra)
        assert b.ops_class().__name__ in b.ops and b.batch_class().__name__ in b.batch
    assert graphable(make_ops("triton", 1, *_tables(), chunk=64, kv_block=64), torch.device("cuda"))


def test_an_unregistered_ops_class_is_named():
    from greta.engine.ops.torch_ops import TorchOps

    class Mine(TorchOps):
        pass

    with pytest.raises(ValueError, match="Mine is not a registered backend"):
        backend_of(Mine(*_tables()))
