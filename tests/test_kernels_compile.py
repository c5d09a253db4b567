"""Compile every kernel for an H100 (sm_90) without a GPU (triton.compile with
an explicit target), bf16, the real tiles. The interpreter never compiles, so
this catches what only the compiler rejects; it also checks that the attention
kernels have no FMA contraction (see docs/KERNELS.md).

Running interpreted kernels leaves triton.language patched (the interpreter
does not undo its patches after a @triton.jit helper call), which breaks the
compiler in the same process. So when the interpreter modules share this
process (TRITON_INTERPRET set), the one test here that runs reruns this file
in a clean process.
"""
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
H100 = GPUTarget("cuda", 90, 32)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
compiled = pytest.mark.skipif(INTERPRETED, reason="reruns in a clean process")


@pytest.mark.skipif(not INTERPRETED, reason="already in a clean process")
def test_compile_in_clean_process():
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # "0", not unset: conftest would set an unset one to 1 on a CPU machine
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def fresh(name):
    """A compiled (not interpreted) copy of kernels/<name>.py, whatever
    TRITON_INTERPRET this process runs with. It lives in a package of its own
    (_aot), so its relative imports (from .gemm import ...) load compiled copies too."""
    if "_aot" not in sys.modules:
        pkg = types.ModuleType("_aot")
        pkg.__path__ = [str(KERNELS)]
        sys.modules["_aot"] = pkg
    spec = importlib.util.spec_from_file_location(f"_aot.{name}", KERNELS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        spec.loader.exec_module(mod)
    return mod


def compile_ptx(fn, types, constexprs, **options):
    """types: arg name -> Triton type ('*bf16', 'i32', ...); constexprs by name."""
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=H100,
                           options=options)
    except RuntimeError as e:  # no ptxas / backend on this machine
        if "ptxas" in str(e).lower():
            pytest.skip(f"cannot compile for sm_90 here: {e}")
        raise
    return k.asm["ptx"]


def ints(*names):
    return {n: "i32" for n in names}


@compiled
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("head_d", [64, 128])
def test_attention_compiles(head_d, decode):
    att = fresh("attention")
    types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "PM": "*fp32", "PL": "*fp32",
             "PACC": "*fp32", "START": "*i64", "qk_scale": "fp32",
             **ints("T", "group", "n_splits", "stride_qt", "stride_qh", "stride_ot", "stride_oh", "s_max")}
    ptx = compile_ptx(att._attn_kernel, types,
                      dict(BLOCK_M=att.BLOCK_M, BLOCK_KV=att.BLOCK_KV, SPLIT_KV=att.SPLIT_KV, HEAD_D=head_d,
                           TMA=False, DECODE=decode),
                      num_warps=att.NUM_WARPS, num_stages=att.NUM_STAGES, enable_fp_fusion=False)
    merge = compile_ptx(att._merge_kernel,
                        {"PM": "*fp32", "PL": "*fp32", "PACC": "*fp32", "O": "*bf16", "POS": "*i64",
                         **ints("n_splits", "stride_oh")},
                        dict(SPLIT_KV=att.SPLIT_KV, HEAD_D=head_d), num_warps=att.NUM_WARPS,
                        enable_fp_fusion=False)
    for text in (ptx, merge):
        assert "fma.rn.f32" not in text  # every fp32 op rounded on its own, in both kernels
        assert "ex2.approx.ftz.f32" in text
    assert "mma" in ptx


@compiled
@pytest.mark.parametrize("tile", ["PREFILL", "DECODE"])
def test_gemm_compiles(tile):
    g = fresh("gemm")
    bm, bn, nw, ns = getattr(g, tile)
    ptx = compile_ptx(g._matmul_kernel, {"X": "*bf16", "W": "*bf16", "Y": "*bf16",
                                         **ints("M", "N", "K", "stride_xm", "stride_xk", "stride_wn",
                                                "stride_wk", "stride_ym", "stride_yn")},
                      dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=g.BLOCK_K),
                      num_warps=nw, num_stages=ns, enable_fp_fusion=False)
    assert "mma" in ptx


@compiled
@pytest.mark.parametrize("segments", [8, 6])
def test_gemm_tree_compiles(segments):
    """Prefill's one-program tree, and decode's two kernels (a program per segment, then the tree)."""
    g = fresh("gemm_tree")
    bm, bn, nw, ns = g.TREE
    ptx = compile_ptx(g._matmul_tree_kernel, {"X": "*bf16", "W": "*bf16", "Y": "*fp32",
                                              **ints("M", "N", "K_SEG", "stride_xm", "stride_xk", "stride_wn",
                                                     "stride_wk", "stride_ym", "stride_yn")},
                      dict(SEGMENTS=segments, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=g.BLOCK_K),
                      num_warps=nw, num_stages=ns, enable_fp_fusion=False)
    assert "mma" in ptx
    ptx = compile_ptx(g._tree_partials_kernel, {"X": "*bf16", "W": "*bf16", "P": "*fp32",
                                                **ints("M", "N", "K_SEG", "stride_xm", "stride_xk", "stride_wn",
                                                       "stride_wk")},
                      dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=g.BLOCK_K),
                      num_warps=nw, num_stages=ns, enable_fp_fusion=False)
    assert "mma" in ptx
    compile_ptx(g._tree_sum_kernel, {"P": "*fp32", "Y": "*bf16", **ints("MN", "N", "stride_ym", "stride_yn")},
                dict(SEGMENTS=segments, BLOCK=g.TREE_SUM_BLOCK), num_warps=4, num_stages=1, enable_fp_fusion=False)


@compiled
def test_elementwise_compile():
    n, r, s = fresh("norm"), fresh("rope"), fresh("swiglu")
    for has_res in (False, True):
        compile_ptx(n._rmsnorm_kernel, {"X": "*bf16", "R": "*bf16", "Wt": "*bf16", "Y": "*bf16", "RES": "*bf16",
                                        "eps": "fp32", **ints("H", "stride_x", "stride_r", "stride_y", "stride_res")},
                    dict(HAS_RES=has_res, BLOCK=n.BLOCK), num_warps=n.NUM_WARPS, enable_fp_fusion=False)
    compile_ptx(r._rope_kernel, {"X": "*bf16", "COS": "*fp32", "SIN": "*fp32", "POS": "*i64", "Y": "*bf16",
                                 **ints("n_heads", "half", "stride_xm", "stride_xh", "stride_ym", "stride_yh",
                                        "stride_c", "stride_s")},
                dict(BLOCK_H=32, BLOCK_D=64), num_warps=r.NUM_WARPS, enable_fp_fusion=False)
    compile_ptx(s._swiglu_kernel, {"G": "*bf16", "U": "*bf16", "Y": "*bf16",
                                   **ints("n_cols", "stride_g", "stride_u", "stride_y")},
                dict(BLOCK=s.BLOCK), num_warps=s.NUM_WARPS, enable_fp_fusion=False)
