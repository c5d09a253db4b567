"""The segment-tree GEMM (kernels/gemm_tree.py matmul_tree) under the Triton interpreter, bit for bit against its
torch reference (kernels/reference.py matmul_tree_ref: the interpreter's tl.dot order per BLOCK_K block, the
segments' fp32 partials added by tree_sum_ref). Outputs in fp32: the interpreter's own fp32 -> bf16 cast
truncates (a GPU's rounds to nearest even), so a bf16 store is compared on the GPU, not here; bf16 inputs are
exact in the fp32 products and are compared here.

What makes tp = 1, 2, 4 agree: a rank's kernel over its S/tp segments returns the subtree, and tree_sum_ref
over the ranks' fp32 results is the whole tree, bit for bit; the plain K loop (today's matmul) is not."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.kernels import gemm_tree  # noqa: E402
from greta.kernels.gemm import matmul  # noqa: E402
from greta.kernels.gemm_tree import matmul_tree  # noqa: E402
from greta.kernels.reference import matmul_tree_ref, tree_sum_ref  # noqa: E402

if not isinstance(gemm_tree._matmul_tree_kernel, InterpretedFunction):
    pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1; run "
                "python -m pytest tests/test_kernels_*.py", allow_module_level=True)

F32 = torch.float32


def rand(*shape, dtype=F32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segments,seg_k,block_k", [(8, 16, 16), (8, 25, 16), (3, 40, 16), (6, 24, 16), (1, 70, 32),
                                                    (5, 8, 16), (24, 8, 16)])
@pytest.mark.parametrize("split", [False, True])
def test_tree_gemm_equals_its_reference_bit_for_bit(segments, seg_k, block_k, dtype, split):
    """Segments a multiple of BLOCK_K and not (a masked tail), powers of two and not (carried nodes); the tree
    in one program per tile (prefill) and in a program per segment, then the tree kernel (decode)."""
    K = segments * seg_k
    x, w = rand(5, K, dtype=dtype, seed=K), rand(37, K, dtype=dtype, seed=K + 1)
    y = matmul_tree(x, w, segments, out_dtype=F32, split=split, block_k=block_k, block_m=16, block_n=16)
    assert torch.equal(y, matmul_tree_ref(x, w, segments, block_k, F32))


def test_a_row_has_the_same_bits_at_any_m():
    """Decode's row (M = 1, split by default) is prefill's row (M = 77, one program per tile)."""
    x, w = rand(77, 96, seed=1), rand(40, 96, seed=2)
    big = matmul_tree(x, w, 8, block_k=16)
    for i in (0, 1, 63, 64, 76):
        assert torch.equal(matmul_tree(x[i:i + 1], w, 8, block_k=16)[0], big[i]), i


@pytest.mark.parametrize("segments,tp", [(8, 2), (8, 4), (8, 8), (6, 3), (12, 3)])
def test_ranks_subtrees_complete_the_one_gemms_tree(segments, tp):
    """tp = 1's one kernel over all of K == the ranks' kernels over their column shards (fp32, unrounded)
    added by tree_sum_ref: the tensor-parallel form, bit for bit."""
    K = segments * 24
    x, w = rand(9, K, seed=3), rand(33, K, seed=4)
    whole = matmul_tree(x, w, segments, block_k=16)
    n = K // tp
    ranks = [matmul_tree(x[:, r * n:(r + 1) * n], w[:, r * n:(r + 1) * n], segments // tp, out_dtype=F32, block_k=16)
             for r in range(tp)]
    assert torch.equal(tree_sum_ref(ranks), whole)


def test_the_plain_k_loop_and_rank_order_are_not_the_tree():
    """Negative controls: today's one K loop over all of K, and 4 ranks' plain products added in rank order,
    each give other bits than the tree somewhere."""
    K = 8 * 64
    x, w = rand(16, K, seed=5), rand(64, K, seed=6)
    tree = matmul_tree(x, w, 8)
    assert not torch.equal(matmul(x, w), tree)
    n = K // 4
    parts = [matmul(x[:, r * n:(r + 1) * n], w[:, r * n:(r + 1) * n]) for r in range(4)]
    assert not torch.equal(parts[0] + parts[1] + parts[2] + parts[3], tree)


def test_the_reference_sees_another_tree():
    """The reference's tree is a real choice: adding the segments left to right gives other bits."""
    parts = [rand(64, 64, seed=s) for s in range(8)]
    chain = parts[0]
    for p in parts[1:]:
        chain = chain + p
    assert not torch.equal(chain, tree_sum_ref(parts))


def test_segments_must_split_k():
    x = rand(2, 30)
    with pytest.raises(ValueError, match="K=30 must split into segments=8 equal parts"):
        matmul_tree(x, x, 8)
