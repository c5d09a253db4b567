"""The probe's negative controls: wrappers around a backend's ops that break decode on purpose, so an audit
that cannot tell them from a correct run is shown to be blind. Prefill (the reference) is left alone.

rope_offset:   decode's RoPE positions are shifted by +1.
kv_off_by_one: decode's attention drops the newest key (each query sees keys 0..pos-1).
"""
from __future__ import annotations

from greta.engine.ops.base import Ops, OpsWrapper, Step


class RopeOffset(OpsWrapper):
    def rope(self, x, step: Step):
        return self.inner.rope(x, step.moved(1) if step.decode else step)


class KvOffByOne(OpsWrapper):
    def decode_attention(self, q, kv, step: Step):
        return self.inner.decode_attention(q, kv, step.moved(-1))


CONTROLS = {"none": None, "rope_offset": RopeOffset, "kv_off_by_one": KvOffByOne}
PERTURBATIONS = tuple(CONTROLS)


def with_control(ops: Ops, perturb: str) -> Ops:
    """ops, wrapped in the negative control `perturb` names ("none": ops as they are)."""
    if perturb not in CONTROLS:
        raise ValueError(f"perturb must be one of {PERTURBATIONS}, got {perturb!r}")
    wrap = CONTROLS[perturb]
    return ops if wrap is None else wrap(ops)
