"""GGML block formats dequantized in torch: uint8 bytes of whole blocks -> fp32 values, vectorised over blocks.

Each function follows ggml's dequantize_row_* (ggml-quants.c) and computes the same fp32 products in the same
order as the gguf package's numpy reference (gguf.quants), so the two agree bit for bit (tests/test_gguf_quants.py).
Block layouts (bytes, in file order; d/dmin/m are fp16; QK_K = 256 values per super-block):
  Q4_0  18 = d, 16 nibbles                 x = d * (q - 8)
  Q4_1  20 = d, m, 16 nibbles              x = d * q + m
  Q5_0  22 = d, qh (32 high bits), 16 nib  x = d * (q - 16)
  Q5_1  24 = d, m, qh, 16 nibbles          x = d * q + m
  Q8_0  34 = d, 32 int8                    x = d * q
  Q2_K  84 = 16 scale bytes (4-bit scale | 4-bit min), 64 bytes of 2-bit q, d, dmin
  Q3_K 110 = 32 bytes high-bit mask, 64 bytes of 2-bit q, 12 bytes of 6-bit scales, d
  Q4_K 144 = d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit q
  Q5_K 176 = d, dmin, 12 bytes of scales and mins, 32 bytes of high bits, 128 bytes of 4-bit q
  Q6_K 210 = 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales, d
Importable without the gguf package: types are named by their GGML names (GGMLQuantizationType.name).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] (little-endian fp16) -> fp32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _shifted(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """uint8 [n, g, L] -> uint8 [n, g, len(shifts), L]: (b >> s) & mask for each shift s. The quants stay
    uint8 (every packed value fits); arithmetic that can go negative happens in fp32, exact on these integers."""
    s = torch.tensor(shifts, dtype=torch.uint8).reshape(1, 1, -1, 1)
    return (b[:, :, None, :] >> s) & mask


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """A 32-value block's 16 bytes -> uint8 [n, 32]: low nibbles are values 0-15, high nibbles 16-31."""
    return _shifted(qs[:, None, :], [0, 4], 0xF).reshape(qs.shape[0], 32)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """A little-endian uint32 of 4 bytes -> uint8 [n, 32]: bit j of it, for value j."""
    return _shifted(qh[:, None, :], list(range(8)), 1).transpose(2, 3).reshape(qh.shape[0], 32)


def dequant_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, 0:2]) * (_nibbles(b[:, 2:18]).float() - 8)


def dequant_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, 0:2]) * _nibbles(b[:, 4:20]).float() + _f16(b[:, 2:4])


def dequant_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)
    return _f16(b[:, 0:2]) * (q.float() - 16)


def dequant_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)
    return _f16(b[:, 0:2]) * q.float() + _f16(b[:, 2:4])


def dequant_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:34].contiguous().view(torch.int8).float() * _f16(b[:, 0:2])


def dequant_q2_k(b: torch.Tensor) -> torch.Tensor:
    """16 groups of 16 values, each with a 4-bit scale and a 4-bit min: group g's 2-bit q are bits
    2 * ((g % 8) // 2) of the 16 qs bytes from 32 * (g // 8) + 16 * (g % 2) (ggml's loop order)."""
    n = b.shape[0]
    sc = b[:, 0:16].to(torch.int32)
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0xF).float())[:, :, None]
    ml = (dmin * (sc >> 4).float())[:, :, None]
    q = _shifted(b[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed 6-bit scales: low 4 bits from bytes 0-7 (low then high nibble), high 2 bits
    from bytes 8-11 (pairs of bits, lowest first)."""
    n = s.shape[0]
    lo = _shifted(s[:, None, 0:8], [0, 4], 0xF).reshape(n, 16)
    hi = _shifted(s[:, None, 8:12], [0, 2, 4, 6], 3).reshape(n, 16)
    return (lo | (hi << 4)).float() - 32


def dequant_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl = (_f16(b[:, 108:110]) * _q3_k_scales(b[:, 96:108]))[:, :, None]
    ql = _shifted(b[:, 32:96].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
    qh = _shifted(b[:, None, 0:32], list(range(8)), 1).reshape(n, 16, 16)
    q = ql.float() - ((qh ^ 1) << 2).float()  # the high bit set means no offset of -4
    return (dl * q).reshape(n, QK_K)


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    s = s.to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(d * scale) * q - dmin * min over eight sub-blocks of 32; q uint8 [n, 8, 32]."""
    n = b.shape[0]
    sc, m = _k_scales_mins(b[:, 4:16])
    dl = (_f16(b[:, 0:2]) * sc.float())[:, :, None]
    ml = (_f16(b[:, 2:4]) * m.float())[:, :, None]
    return (dl * q.float() - ml).reshape(n, QK_K)


def dequant_q4_k(b: torch.Tensor) -> torch.Tensor:
    """Sub-blocks 2g and 2g+1 are the low and high nibbles of bytes 32g..32g+31."""
    n = b.shape[0]
    return _k_affine(b, _shifted(b[:, 16:144].reshape(n, 4, 32), [0, 4], 0xF).reshape(n, 8, 32))


def dequant_q5_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K's nibbles plus a fifth bit: bit j of byte l of the 32 high-bit bytes belongs to sub-block j."""
    n = b.shape[0]
    ql = _shifted(b[:, 48:176].reshape(n, 4, 32), [0, 4], 0xF).reshape(n, 8, 32)
    qh = _shifted(b[:, None, 16:48], list(range(8)), 1).reshape(n, 8, 32)
    return _k_affine(b, ql | (qh << 4))


def dequant_q6_k(b: torch.Tensor) -> torch.Tensor:
    """Two halves of 128 values; in each, 64 bytes of low nibbles (values 0-63 low, 64-127 high) and 32
    bytes of 2-bit high parts (shifts 0, 2, 4, 6 for values 0-31, 32-63, 64-95, 96-127)."""
    n = b.shape[0]
    dl = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float())[:, :, None]
    ql = _shifted(b[:, 0:128].reshape(n, 2, 64), [0, 4], 0xF).reshape(n, 8, 32)
    qh = _shifted(b[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).float() - 32).reshape(n, 16, 16)
    return (dl * q).reshape(n, QK_K)


# GGML type name -> (values per block, bytes per block, dequantizer of uint8 [n_blocks, bytes] -> fp32 [n, values])
BLOCK_TYPES: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q4_0": (32, 18, dequant_q4_0), "Q4_1": (32, 20, dequant_q4_1), "Q5_0": (32, 22, dequant_q5_0),
    "Q5_1": (32, 24, dequant_q5_1), "Q8_0": (32, 34, dequant_q8_0), "Q2_K": (QK_K, 84, dequant_q2_k),
    "Q3_K": (QK_K, 110, dequant_q3_k), "Q4_K": (QK_K, 144, dequant_q4_k), "Q5_K": (QK_K, 176, dequant_q5_k),
    "Q6_K": (QK_K, 210, dequant_q6_k),
}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
KNOWN_TYPES = (*FLOAT_TYPES, *BLOCK_TYPES)


class UnknownTypeError(ValueError):
    pass


def dequantize(kind: str, raw: torch.Tensor) -> torch.Tensor:
    """Flat values of a tensor stored as GGML type `kind`, from its raw bytes (uint8, any shape): the float
    types as they are stored (viewed, not converted), block types dequantized to fp32."""
    raw = raw.reshape(-1)
    if kind in FLOAT_TYPES:
        width = FLOAT_TYPES[kind].itemsize
        if raw.numel() % width:
            raise ValueError(f"{raw.numel()} bytes are not whole {kind} values of {width} bytes")
        return raw.view(FLOAT_TYPES[kind])
    if kind not in BLOCK_TYPES:
        raise UnknownTypeError(f"GGML type {kind} is not one Greta dequantizes (it knows {', '.join(KNOWN_TYPES)})")
    _, size, fn = BLOCK_TYPES[kind]
    if raw.numel() % size:
        raise ValueError(f"{raw.numel()} bytes are not whole {kind} blocks of {size} bytes")
    return fn(raw.reshape(-1, size)).reshape(-1)
