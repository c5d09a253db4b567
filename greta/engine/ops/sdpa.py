"""kv_aligned=0's prefill attention: torch SDPA over the cache prefix, with no repeat_interleave'd K/V (GQA
is the kernels' own) and no materialised mask.

A chunk of T query rows at positions start..start+T-1 sees keys 0..start+T-1, causally (lower-right
aligned). Torch's public `is_causal` is upper-left, and its lower-right bias (`causal_lower_right`) runs
only the flash backend. So on CUDA a chunk is split where every backend can run it, and merged:

    prefix  keys 0..start-1, every row sees all of them: no mask at all
    diagonal  keys start..start+T-1, a square: is_causal (upper-left == lower-right when square)
    o = (o_p · e^(lse_p - lse) + o_d · e^(lse_d - lse)),  lse = logaddexp(lse_p, lse_d)

each part by the first of cuDNN, flash (FA2), memory-efficient that accepts the shapes (torch's own
`can_use_*` checks, GQA included), called through its aten op so that it returns the log-sum-exp the
merge needs. `Attention.backends` records which one ran each part; the first merged chunk of a run is
checked against the public call (`merge_check`; `notes` says why a backend was dropped). Where no backend accepts a part, or on the CPU, it is the
public SDPA call: is_causal for the first chunk, `causal_lower_right` after it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MERGE_TOL = 2e-2  # bf16: a merged chunk within this (times the output's scale) of the public call
ORDER = ("cudnn", "flash", "efficient")  # the order a part tries backends in (fastest first on Hopper)


def _cudnn(q, k, v, causal):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[:2]


def _flash(q, k, v, causal):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]


def _efficient(q, k, v, causal):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[:2]


OPS = {"cudnn": _cudnn, "flash": _flash, "efficient": _efficient}


def _accepts(name: str, q, k, v, causal: bool) -> bool:
    """torch's own check that backend `name` runs these inputs (GQA: k, v with fewer heads than q)."""
    from torch.backends import cuda as tc

    check = {"cudnn": getattr(tc, "can_use_cudnn_attention", None), "flash": tc.can_use_flash_attention,
             "efficient": tc.can_use_efficient_attention}[name]
    if check is None:
        return False
    try:
        return bool(check(tc.SDPAParams(q, k, v, None, 0.0, causal, True)))
    except Exception:  # noqa: BLE001 - an older SDPAParams signature: that backend is not tried
        return False


def merge_lse(o1, lse1, o2, lse2):
    """Two softmax-attention partials over disjoint key sets -> the attention over their union.
    o [B, H, T, D], lse [B, H, T] (natural log-sum-exp of each row's scaled scores)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype)


class Attention:
    """Prefill attention for one run's ops. backends: the backend that ran each part last; notes: why a
    backend was dropped this run (a kernel error, the merge check)."""

    def __init__(self):
        self.backends: dict[str, str] = {}  # part ("diagonal" | "prefix") -> backend that ran it
        self.merge_check: float | None = None  # max |Δ| of the first merged chunk against the public call
        self.refused: set[str] = set()  # backends dropped this run
        self.notes: list[str] = []

    def _part(self, part: str, q, k, v, causal: bool):
        """(o, lse [B, H, T]) of one part by the first backend that accepts its shapes (asked on every call:
        the checks are cheap, and a run's first chunks have other shapes than its later ones), or None."""
        name = next((n for n in ORDER if n not in self.refused and _accepts(n, q, k, v, causal)), None)
        if name is None:
            self.backends[part] = "sdpa"
            return None
        try:
            o, lse = OPS[name](q, k, v, causal)
        except Exception as e:  # noqa: BLE001 - accepted by torch's check, refused by the kernel (or an aten
            # signature of another torch version): not asked again this run
            self.refused.add(name)
            self.notes.append(f"{part}: {name} failed: {' '.join(str(e).split())[:160]}")
            self.backends[part] = "sdpa"
            return None
        self.backends[part] = name
        # lse: [B, H, T] (flash), [B, H, T, 1] (cuDNN) or [B, H, T rounded up] (efficient)
        return o, lse.reshape(*q.shape[:3], -1)[..., 0] if lse.dim() == 4 else lse[..., : q.shape[2]]

    def __call__(self, q, k, v, start: int):
        """q [1, H, T, D] at positions start.., k, v [1, Hkv, start + T, D] -> o [1, H, T, D]."""
        diag = self._part("diagonal", q, k[:, :, start:], v[:, :, start:], True)
        if diag is not None and start == 0:
            return diag[0]
        prefix = self._part("prefix", q, k[:, :, :start], v[:, :, :start], False) if diag is not None else None
        if prefix is not None:
            o = merge_lse(prefix[0], prefix[1], diag[0], diag[1])
            return o if self._merge_checked(o, q, k, v, start) else public_sdpa(q, k, v, start)
        return public_sdpa(q, k, v, start)

    def _merge_checked(self, o, q, k, v, start: int) -> bool:
        """Once per run, the first merged chunk against the public call (a backend whose log-sum-exp is not
        what the merge assumes would show here): on a mismatch both parts go to the public call for good."""
        if self.merge_check is None:
            ref = public_sdpa(q, k, v, start)
            self.merge_check = float((o.float() - ref.float()).abs().max())
            if not self.merge_check <= MERGE_TOL * max(1.0, float(ref.abs().max())):
                self.refused.update(ORDER)
                self.notes.append(f"merge check failed (max |Δ| {self.merge_check:.3g}): every part by the public call")
                self.backends = {"diagonal": "sdpa", "prefix": "sdpa"}
                return False
        return True


def public_sdpa(q, k, v, start: int):
    """The chunk in one public SDPA call: is_causal for the first chunk, a lower-right causal bias after it
    (flash runs it on CUDA; elsewhere torch materialises the mask); on CUDA cuDNN, flash, efficient, math
    in that order of priority."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    T = q.shape[2]
    causal = {"is_causal": True} if start == 0 else {"attn_mask": causal_lower_right(T, start + T)}
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **causal)
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **causal)
