"""greta.engine.gguf_quants against the gguf package's numpy reference (gguf.quants), bit for bit in fp32.

Random blocks: every byte random (every scale, min, high-bit and sign pattern), with the fp16 fields (d, dmin,
m) replaced by random finite values, so a NaN cannot hide a difference. The types gguf.quants can also
quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16) are round-tripped from normal values too. A negative control
shows the comparison sees a one-bit layout mistake."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from greta.engine.gguf_quants import BLOCK_TYPES, KNOWN_TYPES, UnknownTypeError, dequantize  # noqa: E402

# byte offsets of each block type's fp16 fields (ggml's block structs)
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def random_blocks(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, size, _ = BLOCK_TYPES[kind]
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in FP16_FIELDS[kind]:
        raw[:, off:off + 2] = rng.uniform(-2.0, 2.0, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw


def reference(raw: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, Q[kind]), dtype=np.float32).reshape(-1))


def test_block_sizes_are_ggmls():
    for kind, (values, size, _) in BLOCK_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[Q[kind]] == (values, size), kind


@pytest.mark.parametrize("kind", list(BLOCK_TYPES))
def test_random_blocks_match_gguf_quants_bit_for_bit(kind):
    raw = random_blocks(kind, 97, seed=len(kind) + BLOCK_TYPES[kind][1])
    got = dequantize(kind, torch.from_numpy(raw))
    want = reference(raw, kind)
    assert got.dtype == torch.float32 and got.shape == want.shape == (97 * BLOCK_TYPES[kind][0],)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), kind  # the same bits, signed zeros too


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_quantized_values_round_trip_like_gguf_quants(kind):
    x = np.random.default_rng(3).normal(size=(6, 512)).astype(np.float32)
    raw = gguf.quants.quantize(x, Q[kind])
    got = dequantize(kind, torch.from_numpy(raw)).reshape(6, 512)
    assert torch.equal(got, reference(raw, kind).reshape(6, 512))
    bits = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}[kind]
    assert float((got - torch.from_numpy(x)).abs().max()) < 2 * np.abs(x).max() / 2 ** (bits - 1)  # ~ one step


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_float_types_are_their_stored_values(kind):
    x = np.random.default_rng(4).normal(size=(3, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, Q[kind]) if kind != "F32" else x
    got = dequantize(kind, torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8)))
    want = torch.from_numpy(gguf.quants.dequantize(np.ascontiguousarray(raw).view(np.uint8) if kind == "BF16" else raw,
                                                   Q[kind]).astype(np.float32).reshape(-1))
    assert torch.equal(got.float(), want)


def test_a_one_bit_layout_mistake_is_seen():
    """Negative control: Q5_0 with its high bits read from the wrong end of qh differs from the reference."""
    raw = random_blocks("Q5_0", 16, seed=5)
    swapped = raw.copy()
    swapped[:, 2:6] = raw[:, 2:6][:, ::-1]
    assert not torch.equal(dequantize("Q5_0", torch.from_numpy(swapped)), reference(raw, "Q5_0"))


def test_unknown_type_is_refused_naming_it_and_the_known_ones():
    with pytest.raises(UnknownTypeError) as e:
        dequantize("IQ4_NL", torch.zeros(18, dtype=torch.uint8))
    msg = str(e.value)
    assert "\n" not in msg and "IQ4_NL" in msg and all(k in msg for k in KNOWN_TYPES)


def test_partial_block_is_refused():
    with pytest.raises(ValueError, match="Q4_1 blocks of 20 bytes"):
        dequantize("Q4_1", torch.zeros(30, dtype=torch.uint8))
