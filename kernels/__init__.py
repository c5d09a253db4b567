"""Triton kernels for Greta, imported as greta.kernels (see pyproject), and their torch references
(reference.py). The kernels need triton (pip install greta[gpu]); the references do not, and the torch
backends (greta/engine/ops) use them, so on a torch-only install this package holds the references alone.

The design card keeps this folder at the top level, so wherever the checkout's root is on sys.path (`python -m
pytest` or `python -m greta` started there, `python -c`, a notebook kernel whose working directory is the root)
a plain `import kernels` finds it before the PyPI package of that name, which transformers imports. Imported
under that top-level name, this module loads whatever is installed as `kernels` in its place, or raises the
ModuleNotFoundError an interpreter outside the checkout would: Greta's own name for it is only greta.kernels."""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _installed = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _installed  # `import kernels` hands back what sys.modules holds when this body ends
    _spec.loader.exec_module(_installed)
else:
    from .reference import (add_rmsnorm_ref, attention_ref, batch_decode_ref, matmul_ref, rmsnorm_ref, rope_ref,
                            sum_in_order_ref, swiglu_ref, tree_sum_ref, matmul_tree_ref)

    try:
        import triton  # noqa: F401
    except ImportError:  # a torch-only install: greta.engine's torch backends need no more
        triton = None

    if triton is not None:
        import os as _os

        if _os.environ.get("TRITON_INTERPRET") == "1":  # the CPU stands in for the GPU: tl.dot in a fixed order
            from .interpreter import install as _install_fixed_order_dot

            _install_fixed_order_dot()
        from .attention import BLOCK_KV, decode_attention, prefill_attention
        from .flash_decode import flash_decode, flash_decode_batch
        from .batch_attention import batch_decode_attention
        from .gemm import matmul
        from .gemm_tree import matmul_tree
        from .norm import add_rmsnorm, rmsnorm
        from .reduce import sum_in_order
        from .rope import rope
        from .swiglu import swiglu

    __all__ = [
        "BLOCK_KV", "prefill_attention", "decode_attention", "batch_decode_attention", "attention_ref", "batch_decode_ref",
        "flash_decode", "flash_decode_batch",
        "matmul", "matmul_ref", "matmul_tree", "matmul_tree_ref", "tree_sum_ref",
        "rmsnorm", "rmsnorm_ref", "add_rmsnorm", "add_rmsnorm_ref",
        "rope", "rope_ref",
        "swiglu", "swiglu_ref",
        "sum_in_order", "sum_in_order_ref",
    ]
