"""The engine's numerics are pinned: prefill logits at several positions and 8 decode steps on the tiny
preset (CPU), for torch kv_aligned=1 (bf16), torch kv_aligned=0 (bf16) and Triton kv_aligned=1 (fp32, under
Triton's interpreter), each with perturb none / rope_offset / kv_off_by_one; ctx 75 is not a multiple of the
16-row chunk, and kv_block 64 puts the prompt in two KV blocks.

A refactor must not change these bits: that is what the pins guard. But the bits are only defined where they
were made: torch's CPU kernels (MKL / oneDNN) pick code paths by CPU vendor and ISA, and the interpreter's
elementwise math is numpy's SIMD dispatch. So each pin set in engine_numerics_pins.json records the machine it
was made on (`fingerprint()`: CPU, ISA, torch, numpy, triton), and a pin is compared only on a machine with
the same fingerprint; elsewhere the test skips and names what differs. A new machine gets its own pin set with
`python tests/test_engine_numerics.py --pin` (made from the code of that commit; say so in the commit).
Pins must never be edited to make this test pass: a change in them is a change of the engine's numerics.
Within-machine exactness (decode == prefill and its controls) is the other tests' job and holds anywhere.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
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
PINS = Path(__file__).with_name("engine_numerics_pins.json")


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


def cpu_field(name: str) -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.split(":")[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def fingerprint() -> dict:
    """What these bits depend on, read on the machine running the test."""
    from numpy._core._multiarray_umath import __cpu_features__  # numpy's SIMD dispatch (exp, sums...)

    return {"machine": platform.machine(), "cpu_vendor": cpu_field("vendor_id"), "cpu_model": cpu_field("model name"),
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "numpy": np.__version__, "numpy_simd": sorted(k for k, on in __cpu_features__.items() if on),
            "triton": triton.__version__}


def pins_for(here: dict) -> tuple[dict | None, str]:
    """-> (the digests pinned on a machine like this one, or None; why not, naming the differing fields)."""
    sets = json.loads(PINS.read_text())["pin_sets"]
    for pin_set in sets:
        if pin_set["fingerprint"] == here:
            return pin_set["digests"], ""
    nearest = min(sets, key=lambda p: sum(p["fingerprint"].get(k) != v for k, v in here.items()))
    differ = [f"{k} {nearest['fingerprint'].get(k)!r} vs here {v!r}" for k, v in here.items()
              if nearest["fingerprint"].get(k) != v and k != "numpy_simd"]
    if nearest["fingerprint"].get("numpy_simd") != here["numpy_simd"]:
        differ.append("numpy_simd differs")
    return None, ("these bits are pinned only where they are defined; nearest pin set "
                  f"({nearest['made']}): " + "; ".join(differ))


@pytest.mark.parametrize("case", sorted(json.loads(PINS.read_text())["pin_sets"][0]["digests"]))
def test_logits_are_bit_identical_to_the_pins(case):
    digests, why_not = pins_for(fingerprint())
    if digests is None:
        pytest.skip(why_not)
    mode, perturb = case.rsplit("-", 1)
    if mode.startswith("triton") and not isinstance(gemm._matmul_kernel, InterpretedFunction):
        pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1")
    assert digest(*run(mode, perturb)) == digests[case]


def test_the_digest_sees_one_changed_bit():
    """Negative check: the comparison is not vacuous (a one-ulp change in one logit changes the digest)."""
    pre, dec = run("torch-kv0", "none")
    bumped = dec.clone()
    bumped[3, 7] = torch.nextafter(bumped[3, 7], torch.tensor(float("inf")))
    assert digest(pre, bumped) != digest(pre, dec) == digest(*run("torch-kv0", "none"))


def test_a_pin_set_of_another_machine_is_not_compared():
    other = {**fingerprint(), "cpu_model": "some other CPU"}
    digests, why_not = pins_for(other)
    assert digests is None and "cpu_model" in why_not and "some other CPU" in why_not


def make_pin_set(made: str) -> dict:
    cases = sorted(f"{mode}-{perturb}" for mode in MODES for perturb in ("none", "rope_offset", "kv_off_by_one"))
    return {"made": made, "fingerprint": fingerprint(),
            "digests": {case: digest(*run(*case.rsplit("-", 1))) for case in cases}}


if __name__ == "__main__" and sys.argv[1:2] == ["--pin"]:
    print(json.dumps(make_pin_set(" ".join(sys.argv[2:]) or "describe: commit, date, how"), indent=2))
