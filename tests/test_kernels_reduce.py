"""kernels/reduce.py (the one-shot exact all-reduce's sum over peer buffers) against its torch reference and
against the CPU's exact reduction, under the Triton interpreter. fp32 is compared bit for bit; bf16 to two
units in the last place (the interpreter rounds fp32 -> bf16 toward zero; the GPU's rounding is checked bit
for bit by bench/bench_allreduce.py, which compares the kernel with all_gather + sum in rank order)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.kernels import reduce as reduce_mod  # noqa: E402
from greta.kernels.reduce import sum_in_order  # noqa: E402
from greta.kernels.reference import sum_in_order_ref  # noqa: E402

if not isinstance(reduce_mod._sum_kernel, InterpretedFunction):
    pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1; run "
                "python -m pytest tests/test_kernels_*.py", allow_module_level=True)


def _parts(count, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 8).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_sum_in_order_matches_the_reference_fp32(count):
    parts = _parts(count, (5, 300), torch.float32)  # 1500 elements: one partial block
    out = sum_in_order(parts, torch.empty(5, 300), block=512)
    assert torch.equal(out, sum_in_order_ref(parts))


def test_the_order_matters_so_the_check_can_fail():
    """Negative control: fp32 addition is not associative, so the reversed order differs somewhere."""
    small, tiny = _parts(2, (4096,), torch.float32, 1)
    big = torch.full((4096,), 1e8)
    parts = [small, big, -big, tiny * 1e-3]  # in order: small is lost in big; reversed: big cancels first
    out = sum_in_order(parts, torch.empty(4096))
    assert not torch.equal(out, sum_in_order_ref(parts[::-1]))
    assert torch.equal(out, sum_in_order_ref(parts))


def test_sum_in_order_bf16_within_two_ulp():
    parts = _parts(4, (3, 1000), torch.bfloat16, 2)
    out = sum_in_order(parts, torch.empty(3, 1000, dtype=torch.bfloat16))
    ref = sum_in_order_ref(parts)
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1e-30)
    assert ((out.float() - ref.float()).abs() <= 2 * ulp).all()
