"""The kv_aligned=0 fast path on the CPU: flash-decoding (greta.kernels.flash_decode, under Triton's
interpreter, fp32) against its torch reference, alone and batched (flash_decode_batch: rows of several
sequences, each over its own slab); the SDPA prefill's split-and-merge (greta/engine/ops/sdpa.py)
with a CPU backend standing in for cuDNN/flash; CudaFastOps driving the tiny model, alone and in a batch (FastBatchOps); and the CPU path
(TorchOps) against a float64 reference. Each equivalence has a negative control that must fail it.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.engine.ops import make_ops, sdpa  # noqa: E402
from greta.engine.ops.batch import FastBatchOps, TorchBatchOps, batch_ops  # noqa: E402
from greta.engine.ops.controls import KvOffByOne, RopeOffset  # noqa: E402
from greta.engine.ops.cuda_fast import CudaFastOps  # noqa: E402
from greta.engine.ops.torch_ops import TorchOps  # noqa: E402
from greta.engine.requests import decode_together, prefill_all  # noqa: E402
from greta.engine.prompt import synthetic_prompt  # noqa: E402
from greta.engine.runner import Runner  # noqa: E402
from greta.kernels.flash_decode import _split_kernel, flash_decode, flash_decode_batch, split_size  # noqa: E402
from greta.kernels.reference import attention_ref, batch_decode_ref  # noqa: E402

INTERPRETED = isinstance(_split_kernel, InterpretedFunction)
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="greta.kernels was imported before TRITON_INTERPRET=1")


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------ flash-decoding
@needs_interpreter
@pytest.mark.parametrize("H,Hkv,D,S,pos,split", [
    (4, 1, 32, 128, 0, 128),       # one key
    (8, 2, 16, 256, 100, 128),     # past pos in the same split, and whole splits past pos
    (8, 8, 16, 256, 255, 64),      # MHA, the last key of the cache
    (4, 2, 16, 64 * 70, 64 * 70 - 5, 64),  # 70 splits: the merge takes two BLOCK_S steps
])
def test_flash_decode_matches_reference(H, Hkv, D, S, pos, split):
    g = torch.Generator().manual_seed(S + pos)
    q = torch.randn(1, H, D, generator=g)
    k, v = torch.randn(Hkv, S, D, generator=g), torch.randn(Hkv, S, D, generator=g)
    ref = attention_ref(q, k, v, pos)
    err = max_diff(flash_decode(q, k, v, torch.tensor([pos]), split=split), ref)
    assert err < 1e-5
    if pos > 0:  # negative control: the same kernel one key short is far further from the reference
        assert max_diff(flash_decode(q, k, v, torch.tensor([pos - 1]), split=split), ref) > 100 * max(err, 1e-8)


def test_split_size_targets_the_program_count():
    assert split_size(34816, 8) == 256 and split_size(133120, 8) == 1024  # 32k and 128k benches: ~1000 programs
    assert split_size(1024, 1) == 128 and split_size(10**7, 8) == 2048    # clamped both ways
    # a batch's rows bring their own programs: the batch bench's 4k slabs at B=32, 32k slabs at B=8
    assert split_size(7168, 8, rows=32) == 1024 and split_size(35840, 8, rows=8) == 2048
    assert split_size(7168, 8, rows=1) == split_size(7168, 8) == 128


def _slabs(n_seqs, Hkv, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_seqs, Hkv, S, D, generator=g), torch.randn(n_seqs, Hkv, S, D, generator=g)


@needs_interpreter
@pytest.mark.parametrize("H,Hkv,D,split", [(8, 2, 16, 64), (4, 1, 32, 128)])
def test_flash_decode_batch_matches_reference_per_row(H, Hkv, D, split):
    """Rows of four sequences, one of them twice and not in order, at positions 0, split edges and the slab's
    last key: each row is the reference over its own slab up to its own position, and bit for bit
    flash_decode of that row alone with the same split (the same program: the batch adds a row axis). Each
    slab is NaN past the furthest key its rows may read, so a row reading past its position would show."""
    S = 256
    k, v = _slabs(4, Hkv, S, D, seed=H + D)
    seq = torch.tensor([2, 0, 3, 1, 0])
    pos = torch.tensor([0, split - 1, split, 255, 100])
    for b in range(4):
        end = max(p for s, p in zip(seq.tolist(), pos.tolist()) if s == b) + 1
        k[b, :, end:], v[b, :, end:] = float("nan"), float("nan")
    q = torch.randn(len(seq), H, D, generator=torch.Generator().manual_seed(7))
    o = flash_decode_batch(q, k, v, seq, pos, split=split)
    ref = batch_decode_ref(q, k, v, seq, pos)
    err = max_diff(o, ref)
    assert torch.isfinite(o).all() and err < 1e-5
    for i, (b, p) in enumerate(zip(seq.tolist(), pos.tolist())):
        assert torch.equal(o[i], flash_decode(q[i:i + 1], k[b], v[b], torch.tensor([p]), split=split)[0]), i


@needs_interpreter
def test_flash_decode_batch_negative_controls():
    """The check above can fail: a row pointed at another sequence's slab, or one key short, is far from the
    reference; and the default split (chosen for the row count) gives the reference too."""
    k, v = _slabs(3, 2, 256, 16, seed=5)
    q = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(8))
    seq, pos = torch.tensor([0, 1, 2]), torch.tensor([40, 200, 129])
    ref = batch_decode_ref(q, k, v, seq, pos)
    good = flash_decode_batch(q, k, v, seq, pos)
    err = max_diff(good, ref)
    assert err < 1e-5
    wrong_slab = flash_decode_batch(q, k, v, torch.tensor([0, 2, 2]), pos)
    assert max_diff(wrong_slab[1], ref[1]) > 100 * max(err, 1e-8)
    assert torch.equal(wrong_slab[0], good[0])  # the other rows are their own
    short = flash_decode_batch(q, k, v, seq, pos - torch.tensor([0, 0, 1]))
    assert max_diff(short[2], ref[2]) > 100 * max(err, 1e-8)


# ------------------------------------------------------------------------------ SDPA prefill
def _cpu_flash(q, k, v, causal):
    """A CPU stand-in for the CUDA backends: torch's CPU flash kernel, which also returns the log-sum-exp."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[:2]


def _qkv(T, start, H=8, Hkv=2, D=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(T + start)
    q = torch.randn(T, H, D, generator=g, dtype=dtype)
    kc, vc = torch.randn(Hkv, start + T, D, generator=g, dtype=dtype), torch.randn(Hkv, start + T, D, generator=g, dtype=dtype)
    return q, kc, vc


def _run(attn, q, kc, vc, start):
    return attn(q.transpose(0, 1)[None], kc[None], vc[None], start)[0].transpose(0, 1)


@pytest.mark.parametrize("T,start", [(16, 0), (16, 48), (7, 100)])
def test_public_sdpa_prefill_matches_reference(T, start):
    """The CPU path (one public SDPA call, GQA by the kernel, no mask tensor) against the float reference."""
    q, kc, vc = _qkv(T, start)
    a = sdpa.Attention()
    assert max_diff(_run(a, q, kc, vc, start), attention_ref(q, kc, vc, start)) < 1e-5  # the reference rounds to fp32
    assert a.backends == {"diagonal": "sdpa"}  # no CUDA backend on the CPU


@pytest.mark.parametrize("T,start", [(16, 0), (16, 48), (7, 100)])
def test_split_and_merge_matches_reference(monkeypatch, T, start):
    """The CUDA path's prefix + diagonal split, merged by log-sum-exp, with the CPU flash kernel as the backend."""
    monkeypatch.setitem(sdpa.OPS, "flash", _cpu_flash)
    monkeypatch.setattr(sdpa, "_accepts", lambda name, q, k, v, causal: name == "flash")
    q, kc, vc = _qkv(T, start)
    a = sdpa.Attention()
    o = _run(a, q, kc, vc, start)
    assert a.backends == ({"diagonal": "flash"} if start == 0 else {"diagonal": "flash", "prefix": "flash"})
    assert (a.merge_check is None) == (start == 0) and (start == 0 or a.merge_check < 1e-5)
    ref = attention_ref(q, kc, vc, start)
    assert max_diff(o, ref) < 1e-5  # the reference rounds to fp32
    if start:  # negative control: the diagonal alone (the prefix's weight dropped) is far off
        assert max_diff(_cpu_flash(q.transpose(0, 1)[None], kc[None, :, start:], vc[None, :, start:], True)[0][0]
                        .transpose(0, 1), ref) > 1e-2


def test_a_merge_that_disagrees_falls_back_to_the_public_call(monkeypatch):
    """A backend whose log-sum-exp is not the natural one (here: in log2) fails the run's merge check, and
    the chunk (and every later one) runs through the public call instead."""
    monkeypatch.setitem(sdpa.OPS, "flash", lambda q, k, v, c: (lambda o, lse: (o, lse / 0.6931471805599453))(*_cpu_flash(q, k, v, c)))
    monkeypatch.setattr(sdpa, "_accepts", lambda name, q, k, v, causal: name == "flash")
    q, kc, vc = _qkv(16, 48)
    a = sdpa.Attention()
    assert max_diff(_run(a, q, kc, vc, 48), attention_ref(q, kc, vc, 48)) < 1e-5
    assert a.merge_check > sdpa.MERGE_TOL and a.backends == {"diagonal": "sdpa", "prefix": "sdpa"}
    assert len(a.notes) == 1 and a.notes[0].startswith("merge check failed")
    assert max_diff(_run(a, q, kc, vc, 48), attention_ref(q, kc, vc, 48)) < 1e-5
    assert a.backends == {"diagonal": "sdpa", "prefix": "sdpa"} and len(a.notes) == 1


def test_a_backend_that_raises_is_dropped_for_the_run(monkeypatch):
    calls = []

    def refuse(q, k, v, c):
        calls.append(1)
        raise RuntimeError("cuDNN Frontend error:\n no engine")

    monkeypatch.setitem(sdpa.OPS, "cudnn", refuse)
    monkeypatch.setitem(sdpa.OPS, "flash", _cpu_flash)
    monkeypatch.setattr(sdpa, "_accepts", lambda name, q, k, v, causal: name in ("cudnn", "flash"))
    q, kc, vc = _qkv(16, 48)
    a = sdpa.Attention()
    for _ in range(2):
        assert max_diff(_run(a, q, kc, vc, 48), attention_ref(q, kc, vc, 48)) < 1e-5
    assert calls == [1] and a.backends == {"diagonal": "flash", "prefix": "flash"}
    assert a.notes == ["diagonal: cudnn failed: cuDNN Frontend error: no engine"]


def test_merge_lse_negative_control():
    """Swapping the two partials' log-sum-exps gives a different answer (the merge uses them)."""
    g = torch.Generator().manual_seed(1)
    o1, o2 = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64), torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    l1, l2 = torch.randn(1, 2, 3, generator=g, dtype=torch.float64), torch.randn(1, 2, 3, generator=g, dtype=torch.float64) + 2
    assert max_diff(sdpa.merge_lse(o1, l1, o2, l2), sdpa.merge_lse(o1, l2, o2, l1)) > 1e-2
    assert max_diff(sdpa.merge_lse(o1, l1, o2, l2), sdpa.merge_lse(o2, l2, o1, l1)) < 1e-12  # symmetric


# ------------------------------------------------------------------------------ the whole model
def test_make_ops_on_cpu_is_plain_torch(tiny_cfg):
    cos = torch.zeros(8, tiny_cfg.head_dim // 2)
    assert type(make_ops("triton", False, cos, cos, chunk=16, kv_block=64)) is TorchOps


def _tiny_run(cfg, w, ops_cls, ctx=70, steps=4, wrap=None):
    """(prefill logits at the last prompt row + teacher-forced decode logits, the same rows from one prefill)."""
    prompt = synthetic_prompt(ctx + steps, cfg.vocab_size, 5)
    m = Runner(cfg, w, max_tokens=ctx + steps, kv_aligned=0, chunk=16, kv_block=64)
    m.ops = ops_cls(m.cos, m.sin) if wrap is None else wrap(ops_cls(m.cos, m.sin))
    out = [m.prefill(prompt[:ctx])[0]] + [m.decode(prompt[ctx + j], ctx + j) for j in range(steps - 1)]
    ref = Runner(cfg, w, max_tokens=ctx + steps, kv_aligned=0, chunk=16, kv_block=64)
    ref.ops = ops_cls(ref.cos, ref.sin)
    return torch.stack(out), ref.prefill(prompt[:ctx + steps - 1], keep=list(range(ctx - 1, ctx + steps - 1)))


@needs_interpreter
def test_cuda_fast_ops_decode_agrees_with_prefill_and_torch(tiny_cfg, tiny_weights):
    """CudaFastOps (Triton norm/rope/swiglu, flash-decoding) on the tiny model in fp32: decode reproduces
    prefill, and both the plain torch path; kv_off_by_one wrapped around it must break decode."""
    w = tiny_weights(torch.float32)
    dec, ref = _tiny_run(tiny_cfg, w, CudaFastOps)
    assert max_diff(dec, ref) < 1e-3
    assert max_diff(ref, _tiny_run(tiny_cfg, w, TorchOps)[1]) < 1e-3
    bad, ref_bad = _tiny_run(tiny_cfg, w, CudaFastOps, wrap=KvOffByOne)
    assert max_diff(bad[1:], ref_bad[1:]) > 100 * max(max_diff(dec, ref), 1e-6)


def test_cpu_kv0_matches_a_float64_reference(tiny_cfg, tiny_weights):
    """bf16 kv0 prefill and decode logits within bf16 tolerance (0.05) of the same model run in float64 (whose
    RMSNorm and RoPE references compute in fp32, and whose logits come back as fp32); a control (the float64
    run with decode's RoPE one position off) fails that tolerance."""
    w16 = tiny_weights(torch.bfloat16)
    w64 = {k: v.double() for k, v in w16.items()}  # the same (bf16-rounded) weights, in float64
    dec16, ref16 = _tiny_run(tiny_cfg, w16, TorchOps)
    dec64, ref64 = _tiny_run(tiny_cfg, w64, TorchOps)
    assert max_diff(dec64, ref64) < 1e-5  # in float64 decode and prefill agree to the fp32 logits' rounding
    assert 0 < max_diff(dec16, dec64) < 0.05 and 0 < max_diff(ref16, dec64) < 0.05  # measured 0.024, 0.022
    bad64, _ = _tiny_run(tiny_cfg, w64, TorchOps, wrap=RopeOffset)
    assert max_diff(bad64[1:], dec64[1:]) > 0.05  # measured 0.13


# ------------------------------------------------------------------------------ a batch decode step
def _install_fast(wrap=None):
    """A Runner's batch decode swapped for the CUDA fast path's (on the CPU it would pick TorchOps).
    Prefill stays TorchOps' (the kv0 CPU path): interpreted, the fast path's prefill would take most of the
    test's time and is test_cuda_fast_ops_decode_agrees_with_prefill_and_torch's business."""
    def install(br):
        fast = batch_ops(CudaFastOps(br.cos, br.sin))
        assert type(fast) is FastBatchOps
        br.batch_ops = fast if wrap is None else wrap(fast)
    return install


@needs_interpreter
def test_fast_batch_ops_decode_agrees_with_prefill_and_torch(tiny_cfg, tiny_weights):
    """FastBatchOps (CudaFastOps' row-wise ops, batched flash-decoding) decoding the tiny model in fp32: a
    batch of three (uneven lengths, one sequence leaving early) agrees with each request alone (FastBatchOps
    at one row) and with its teacher-forced prefill, and with the plain torch batch (TorchBatchOps);
    kv_off_by_one wrapped around the batch ops must break the batch's first decode step (whose inputs are the
    same: prefill is left alone)."""
    from test_batch import three_ways  # tests/ is on sys.path (rootdir-relative test modules)

    w = tiny_weights(torch.float32)
    lengths, gens = [20, 35, 47], [2, 2, 1]
    fast, tokens = three_ways(tiny_cfg, w, lengths, gens, kv_aligned=0, install=_install_fast())
    err = max(max(max_diff(a, x), max_diff(x, c)) for a, x, c in fast)
    assert err < 1e-3
    torch_run, torch_tokens = three_ways(tiny_cfg, w, lengths, gens, kv_aligned=0)
    assert torch_tokens == tokens
    assert max(max_diff(x, tx) for (_, x, _), (_, tx, _) in zip(fast, torch_run)) < 1e-3
    br = Runner(tiny_cfg, w, n_seqs=3, max_tokens=max(lengths) + max(gens), kv_aligned=0, chunk=16, kv_block=64)
    _install_fast(KvOffByOne)(br)
    prompts = [synthetic_prompt(n, tiny_cfg.vocab_size, 10 + b) for b, n in enumerate(lengths)]
    _, bad = decode_together(br, lengths, prefill_all(br, prompts), [1, 1, 1], keep=1)
    assert min(max_diff(bad[b][0], fast[b][2][1]) for b in range(3)) > 100 * max(err, 1e-6)


def test_batch_ops_picks_batched_flash_decoding_for_the_fast_path():
    cos = torch.zeros(8, 4)
    assert type(batch_ops(CudaFastOps(cos, cos))) is FastBatchOps
    assert type(batch_ops(TorchOps(cos, cos))) is TorchBatchOps
