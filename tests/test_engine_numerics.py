"""The engine's numerics are pinned: prefill logits at several positions and 8 decode steps on the tiny
preset (CPU), for torch kv_aligned=1 (bf16), torch kv_aligned=0 (bf16) and Triton kv_aligned=1 (fp32, under
Triton's interpreter), each with perturb none / rope_offset / kv_off_by_one; ctx 75 is not a multiple of the
16-row chunk, and kv_block 64 puts the prompt in two KV blocks.

The sha256 values below were computed by this same procedure on the engine as it was BEFORE the ops refactor
(branch engine, parent commit 3371f3c: greta/engine/model.py's Llama with its two layer loops), and checked
to be independent of the torch thread count. They must never be edited to make this test pass: a change in
them is a change of the engine's numerics, which a refactor must not make.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import hashlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.engine.config import PRESETS  # noqa: E402
from greta.engine.runner import Runner  # noqa: E402
from greta.engine.prompt import synthetic_prompt  # noqa: E402
from greta.engine.weights import synthetic  # noqa: E402
from greta.kernels import gemm  # noqa: E402

CFG = PRESETS["tiny"]
CTX, STEPS, CHUNK, KV_BLOCK = 75, 8, 16, 64
KEEP = [0, 15, 16, 40, 63, 64, 74]  # first row, both sides of a tile edge, the KV block edge, the last row
MODES = {"torch-kv1": ("torch", 1, torch.bfloat16), "torch-kv0": ("torch", 0, torch.bfloat16),
         "triton-kv1": ("triton", 1, torch.float32)}
BEFORE = {  # sha256(prefill logits bytes + decode logits bytes), fp32 little-endian; see the module docstring
    "torch-kv1-none": "905058786c7b00bb2e83088e2b7eb3a38ff986cb85fb0e7425fbfe5443b4a39c",
    "torch-kv1-rope_offset": "c9574ee76cc1b6455fe71072ef05b51f753e03831c14c38439e7661bc31a706d",
    "torch-kv1-kv_off_by_one": "64ea4ca7e12ed5f2df6083f80a87d48b01fb139a5945da1dbb5a62c28d82ec88",
    "torch-kv0-none": "010361d81503f4d4ad21cd398386d5afed8a7775eca02639351c6808d43406e6",
    "torch-kv0-rope_offset": "83bbcadc9a1795a201c4cad199b97fc0b468fb464b5495315cc1a638e53f567e",
    "torch-kv0-kv_off_by_one": "5bdf4ef547737cb1b558d24a03bc80208b4b53dfbb14fac51690b8425c1ad8ae",
    "triton-kv1-none": "e18546158d9f75cf8b61a20e6ea9c60ae41c3c730125ad7bdab6576ed77a6eb8",
    "triton-kv1-rope_offset": "2211d5b307e23a79bbe8d0e88e9e4f941a8ff26cf1750d970939b2de8ef52294",
    "triton-kv1-kv_off_by_one": "00149b84eb9a463bb7abba030d623020db352d8176749b1141fa39ee43ad51bc",
}


def run(mode: str, perturb: str) -> tuple[torch.Tensor, torch.Tensor]:
    backend, kv_aligned, dtype = MODES[mode]
    w = synthetic(CFG, 0, dtype, "cpu")
    prompt = synthetic_prompt(CTX + STEPS, CFG.vocab_size, 3)
    m = Runner(CFG, w, max_tokens=CTX + STEPS, kv_aligned=kv_aligned, chunk=CHUNK, kv_block=KV_BLOCK,
               perturb=perturb, backend=backend)
    pre = m.prefill(prompt[:CTX], keep=KEEP)
    dec = torch.stack([m.decode(prompt[CTX + j], CTX + j) for j in range(STEPS)])  # teacher-forced tokens
    return pre, dec


def digest(pre: torch.Tensor, dec: torch.Tensor) -> str:
    assert pre.dtype == dec.dtype == torch.float32 and pre.shape == (len(KEEP), CFG.vocab_size)
    return hashlib.sha256(pre.numpy().tobytes() + dec.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_logits_are_bit_identical_to_before_the_refactor(case):
    mode, perturb = case.rsplit("-", 1)
    if mode.startswith("triton") and not isinstance(gemm._matmul_kernel, InterpretedFunction):
        pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1")
    assert digest(*run(mode, perturb)) == BEFORE[case]


def test_the_digest_sees_one_changed_bit():
    """Negative check: the comparison is not vacuous (a one-ulp change in one logit changes the digest)."""
    pre, dec = run("torch-kv0", "none")
    bumped = dec.clone()
    bumped[3, 7] = torch.nextafter(bumped[3, 7], torch.tensor(float("inf")))
    assert digest(pre, bumped) != digest(pre, dec) == BEFORE["torch-kv0-none"]
