"""The engine's Triton backend (kv_aligned=1) under Triton's interpreter on the CPU, tiny model, fp32
(the interpreter's bf16 tl.dot is wrong; bf16 runs in tests/test_kernels_gpu.py and the GPU records)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

from functools import lru_cache

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.engine.config import PRESETS  # noqa: E402
from greta.kernels import gemm  # noqa: E402
from greta.engine.runner import Runner  # noqa: E402
from greta.probe.preflight import preflight  # noqa: E402
from greta.record.params import ParamError, load_params  # noqa: E402
from greta.engine.weights import synthetic  # noqa: E402

if not isinstance(gemm._matmul_kernel, InterpretedFunction):
    pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1", allow_module_level=True)

CFG = PRESETS["tiny"]
CTX, SPAN = 150, 3  # ctx crosses kernel blocks and the 64-row prefill chunks at odd places


@lru_cache(maxsize=None)
def decode_vs_reference(backend, perturb="none"):
    w = synthetic(CFG, 0, torch.float32, "cpu")
    prompt = torch.randint(0, CFG.vocab_size, (CTX,), generator=torch.Generator().manual_seed(1))
    m = Runner(CFG, w, max_tokens=CTX + SPAN, kv_aligned=1, chunk=64, kv_block=128, perturb=perturb, backend=backend)
    first = m.prefill(prompt)[0]
    toks, dec = [int(first.argmax())], [first]
    for j in range(SPAN - 1):
        dec.append(m.decode(torch.tensor(toks[-1]), CTX + j))
        toks.append(int(dec[-1].argmax()))
    ref_model = Runner(CFG, w, max_tokens=CTX + SPAN, kv_aligned=1, chunk=64, kv_block=128, backend=backend)
    ref = ref_model.prefill(torch.cat([prompt, torch.tensor(toks[:-1])]), keep=list(range(CTX - 1, CTX + SPAN - 1)))
    return torch.stack(dec), ref


def test_triton_decode_equals_prefill_bit_for_bit():
    dec, ref = decode_vs_reference("triton")
    assert torch.equal(dec, ref)


def test_triton_backend_agrees_with_torch_backend():
    tri, _ = decode_vs_reference("triton")
    tor, _ = decode_vs_reference("torch")
    torch.testing.assert_close(tri, tor, rtol=1e-4, atol=1e-4)  # fp32: different but tiny rounding


@pytest.mark.parametrize("perturb", ["rope_offset", "kv_off_by_one"])
def test_triton_negative_control_fails(perturb):
    dec, ref = decode_vs_reference("triton", perturb=perturb)
    assert (dec - ref).abs().max() > 5e-3


def test_triton_on_cpu_param_checks(monkeypatch):
    with pytest.raises(ParamError, match="dtype=float32"):
        preflight(load_params(None, {"backend": "triton", "dtype": "bfloat16"}))
    assert preflight(load_params(None, {"backend": "triton", "dtype": "float32"})).backend == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ParamError, match="TRITON_INTERPRET=1"):
        preflight(load_params(None, {"backend": "triton", "dtype": "float32"}))
