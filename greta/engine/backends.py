"""The backends of the decoder's ops (greta/engine/ops/), each declaring what it is: the one place a backend is
chosen (make_ops), its batch wrapper found (batch_ops) and its CUDA-graph capability read (the runners).
Torch-free, so that params can take its choices without importing torch.

  name         what records and messages call it
  exact        decode ≡ prefill bit for bit (batch-invariant: kv_aligned=1 runs it)
  graphable    nothing in a decode step reads a device value on the host, so a runner on CUDA may capture the
               step in a CUDA graph and replay it
  needs_cuda   runs only where the cos/sin tables live on a CUDA device
  ops, batch   "module:Class" of the Ops and of its batch wrapper (imported when chosen: Triton stays optional)

The `backend` param names the exact backend a kv_aligned=1 run uses (PARAM_BACKENDS); kv_aligned=0 always takes
the fast path of the device (cuda_fast on CUDA with Triton, torch elsewhere), whichever backend is named.
Adding a backend is one entry here plus its Ops class.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    exact: bool
    graphable: bool
    needs_cuda: bool
    ops: str
    batch: str

    def ops_class(self) -> type:
        return _load(self.ops)

    def batch_class(self) -> type:
        return _load(self.batch)


_OPS = "greta.engine.ops"
BACKENDS: tuple[Backend, ...] = (
    Backend("triton", exact=True, graphable=True, needs_cuda=False,
            ops=f"{_OPS}.triton_ops:TritonOps", batch=f"{_OPS}.batch:TritonBatchOps"),
    Backend("tiled_torch", exact=True, graphable=False, needs_cuda=False,
            ops=f"{_OPS}.tiled_torch:TiledTorchOps", batch=f"{_OPS}.batch:TiledBatchOps"),
    Backend("cuda_fast", exact=False, graphable=True, needs_cuda=True,
            ops=f"{_OPS}.cuda_fast:CudaFastOps", batch=f"{_OPS}.batch:FastBatchOps"),
    Backend("torch", exact=False, graphable=False, needs_cuda=False,
            ops=f"{_OPS}.torch_ops:TorchOps", batch=f"{_OPS}.batch:TorchBatchOps"),
)
BY_NAME = {b.name: b for b in BACKENDS}
# the `backend` param -> the exact backend it names (what a kv_aligned=1 run computes with)
EXACT_FOR_PARAM = {"torch": "tiled_torch", "triton": "triton"}
PARAM_BACKENDS = tuple(EXACT_FOR_PARAM)


def _load(spec: str) -> type:
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def choose(param: str, kv_aligned: bool, on_cuda: bool) -> Backend:
    """The backend a run computes with: the exact one the param names (kv_aligned=1), else the device's
    fast path: cuda_fast on CUDA where Triton is installed, torch elsewhere."""
    if param not in EXACT_FOR_PARAM:
        raise ValueError(f"backend must be one of {', '.join(PARAM_BACKENDS)}, got {param!r}")
    if kv_aligned:
        return BY_NAME[EXACT_FOR_PARAM[param]]
    return BY_NAME["cuda_fast" if on_cuda and _has_triton() else "torch"]


def backend_of(ops) -> Backend:
    """The registry entry of ops' innermost backend (wrappers such as controls and TP unwrapped)."""
    while hasattr(ops, "inner"):
        ops = ops.inner
    for b in BACKENDS:  # exact class: CudaFastOps and TiledTorchOps are TorchOps by inheritance
        if type(ops).__module__ + ":" + type(ops).__name__ == b.ops:
            return b
    raise ValueError(f"{type(ops).__name__} is not a registered backend (greta/engine/backends.py)")


def _has_triton() -> bool:
    from greta import kernels

    return kernels.triton is not None
