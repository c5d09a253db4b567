"""greta.engine.runner.Runner (greta.engine.model's decoder over its ops) on the tiny preset (synthetic weights,
CPU): decode vs. prefill, negative controls, weights (synthetic and checkpoint) and prompts.

The reference in these tests is always a *separate* Runner with its own KV cache, so nothing the
decode path wrote can leak into it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from greta.engine.source import load_config
from greta.engine.runner import Runner
from greta.engine.prompt import file_prompt, make_prompt, synthetic_prompt
from greta.engine.weights import checkpoint_hash, load_checkpoint, save_checkpoint, synthetic, synthetic_hash


def decode_and_reference(cfg, w, ctx, steps, *, kv_aligned, chunk, kv_block, perturb="none", seed=0):
    """Greedy: prefill ctx prompt tokens, then steps-1 decode steps. Returns (path logits [steps, V],
    reference logits [steps, V], tokens); row 0 is the prefill's last position, rows 1.. decode steps.
    The reference is one teacher-forced prefill over prompt + generated tokens on a fresh model."""
    prompt = synthetic_prompt(ctx, cfg.vocab_size, seed)
    m = Runner(cfg, w, max_tokens=ctx + steps, kv_aligned=kv_aligned, chunk=chunk, kv_block=kv_block, perturb=perturb)
    first = m.prefill(prompt)
    assert first.shape == (1, cfg.vocab_size) and first.dtype == torch.float32
    out, toks = [first[0]], [int(first[0].argmax())]
    for j in range(steps - 1):
        logits = m.decode(torch.tensor(toks[-1]), ctx + j)
        assert logits.shape == (cfg.vocab_size,)
        out.append(logits)
        toks.append(int(logits.argmax()))
    ref_model = Runner(cfg, w, max_tokens=ctx + steps, kv_aligned=kv_aligned, chunk=chunk, kv_block=kv_block)
    seq = torch.cat([prompt, torch.tensor(toks[: steps - 1])])
    ref = ref_model.prefill(seq, keep=list(range(ctx - 1, ctx + steps - 1)))
    return torch.stack(out), ref, toks


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# --- kv_aligned=1: bit for bit ----------------------------------------------------------------------
# (ctx, steps, prefill_chunk, kv_block): ctx a multiple of neither the tile nor the block; prompts spanning
# several KV blocks; decode steps that cross a tile boundary and a KV block boundary; kv_block < chunk.
ALIGNED_CASES = [
    (254, 6, 64, 128),   # 2 blocks; decode crosses the tile and block boundary at 256
    (300, 4, 128, 64),   # 5 blocks of 64 under a 128-row tile
    (517, 4, 128, 256),  # 3 blocks of 256, last chunk 5 rows
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("ctx,steps,chunk,kv_block", ALIGNED_CASES)
def test_aligned_decode_is_bit_exact(tiny_cfg, tiny_weights, dtype, ctx, steps, chunk, kv_block):
    assert ctx % chunk and ctx % kv_block
    dec, ref, toks = decode_and_reference(tiny_cfg, tiny_weights(dtype), ctx, steps,
                                          kv_aligned=1, chunk=chunk, kv_block=kv_block)
    assert torch.isfinite(dec).all()
    assert torch.equal(dec, ref), f"max diff {max_diff(dec, ref)}"
    assert [int(t) for t in ref.argmax(-1)] == toks


def test_aligned_prefill_must_start_on_a_tile(tiny_cfg, tiny_weights):
    m = Runner(tiny_cfg, tiny_weights(), max_tokens=256, kv_aligned=1, chunk=64, kv_block=128)
    with pytest.raises(ValueError, match="tile"):
        m.prefill(torch.zeros(10, dtype=torch.int64), start=10)


# --- kv_aligned=0: the true drift ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.1), (torch.float32, 1e-3)], ids=["bf16", "fp32"])
def test_unaligned_reports_real_small_drift(tiny_cfg, tiny_weights, dtype, bound):
    w = tiny_weights(dtype)
    dec0, ref0, _ = decode_and_reference(tiny_cfg, w, 254, 6, kv_aligned=0, chunk=64, kv_block=128)
    dec1, ref1, _ = decode_and_reference(tiny_cfg, w, 254, 6, kv_aligned=1, chunk=64, kv_block=128)
    d0, d1 = max_diff(dec0, ref0), max_diff(dec1, ref1)
    assert d1 == 0.0
    assert np.isfinite(d0) and d0 < bound  # the measured value, whatever it is, is small
    assert torch.equal(dec0.argmax(-1), ref0.argmax(-1))
    # the two modes compute the same function: on the prompt alone (row 0: the generated tokens of the two
    # modes may part later) their references agree to within the drift bound
    assert max_diff(ref0[0], ref1[0]) < bound


# --- negative controls ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_aligned", [1, 0])
@pytest.mark.parametrize("perturb", ["rope_offset", "kv_off_by_one"])
def test_negative_controls_break_decode(tiny_cfg, tiny_weights, perturb, kv_aligned):
    dec, ref, _ = decode_and_reference(tiny_cfg, tiny_weights(), 200, 4, kv_aligned=kv_aligned, chunk=64,
                                       kv_block=128, perturb=perturb)
    # step 0 comes from prefill, which the perturbation does not touch
    assert torch.equal(dec[0], ref[0]) or kv_aligned == 0
    assert max_diff(dec[1:], ref[1:]) > 5e-3


@pytest.mark.parametrize("perturb", ["rope_offset", "kv_off_by_one"])
def test_negative_controls_stand_far_above_unaligned_drift_in_fp32(tiny_cfg, tiny_weights, perturb):
    # In bf16 the kv_aligned=0 drift is of the same order as kv_off_by_one's effect; in fp32 they separate.
    w = tiny_weights(torch.float32)
    base = max_diff(*decode_and_reference(tiny_cfg, w, 200, 4, kv_aligned=0, chunk=64, kv_block=128)[:2])
    bad = max_diff(*decode_and_reference(tiny_cfg, w, 200, 4, kv_aligned=0, chunk=64, kv_block=128,
                                         perturb=perturb)[:2])
    assert bad > 5e-3
    assert bad > 100 * base


def test_unknown_perturbation_is_refused(tiny_cfg, tiny_weights):
    with pytest.raises(ValueError, match="perturb"):
        Runner(tiny_cfg, tiny_weights(), max_tokens=64, kv_aligned=1, chunk=64, kv_block=64, perturb="nope")


# --- chunking ----------------------------------------------------------------------------------------
def test_chunk_size_barely_moves_unaligned_prefill(tiny_cfg, tiny_weights):
    w = tiny_weights()
    prompt = synthetic_prompt(300, tiny_cfg.vocab_size, 1)
    keep = [0, 63, 64, 150, 299]
    outs = {}
    for chunk in (37, 64, 128, 300):
        m = Runner(tiny_cfg, w, max_tokens=300, kv_aligned=0, chunk=chunk, kv_block=128)
        outs[chunk] = m.prefill(prompt, keep=keep)
        assert outs[chunk].shape == (len(keep), tiny_cfg.vocab_size)
        assert torch.isfinite(outs[chunk]).all()
    for chunk, o in outs.items():
        assert max_diff(o, outs[300]) < 0.1, chunk
        assert torch.equal(o.argmax(-1), outs[300].argmax(-1)), chunk


def test_aligned_prefill_in_pieces_matches_one_pass(tiny_cfg, tiny_weights):
    """Prefill of a prompt in two calls (second starting on a tile) reproduces one call bit for bit."""
    w = tiny_weights()
    prompt = synthetic_prompt(200, tiny_cfg.vocab_size, 2)
    a = Runner(tiny_cfg, w, max_tokens=200, kv_aligned=1, chunk=64, kv_block=128)
    one = a.prefill(prompt, keep=[130, 199])
    b = Runner(tiny_cfg, w, max_tokens=200, kv_aligned=1, chunk=64, kv_block=128)
    b.prefill(prompt[:128])
    two = b.prefill(prompt[128:], start=128, keep=[130, 199])
    assert torch.equal(one, two)


def test_progress_callback_reports_every_chunk(tiny_cfg, tiny_weights):
    m = Runner(tiny_cfg, tiny_weights(), max_tokens=150, kv_aligned=0, chunk=64, kv_block=128)
    seen = []
    m.prefill(synthetic_prompt(150, tiny_cfg.vocab_size, 0), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(64, 150), (128, 150), (150, 150)]


# --- weights ---------------------------------------------------------------------------------------
def test_synthetic_weights_are_deterministic_from_the_seed(tiny_cfg):
    a = synthetic(tiny_cfg, 7, torch.bfloat16, "cpu")
    b = synthetic(tiny_cfg, 7, torch.bfloat16, "cpu")
    c = synthetic(tiny_cfg, 8, torch.bfloat16, "cpu")
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    random = [k for k in a if "norm" not in k]
    assert random and all(not torch.equal(a[k], c[k]) for k in random)
    # distinct tensors differ from each other (name enters the seed)
    assert not torch.equal(a["0.wqkv"], a["1.wqkv"])
    assert synthetic_hash(tiny_cfg, 7) == synthetic_hash(tiny_cfg, 7) != synthetic_hash(tiny_cfg, 8)


def test_synthetic_weights_shapes(tiny_cfg, tiny_weights):
    w = tiny_weights()
    c = tiny_cfg
    assert w["embed"].shape == w["lm_head"].shape == (c.vocab_size, c.hidden_size)
    assert w["0.wqkv"].shape == ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.hidden_size)
    assert w["1.w13"].shape == (2 * c.intermediate_size, c.hidden_size)
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert sum(t.numel() for t in w.values()) == c.param_count()


def test_logits_finite_and_not_degenerate(tiny_cfg, tiny_weights):
    n = 384
    m = Runner(tiny_cfg, tiny_weights(), max_tokens=n, kv_aligned=0, chunk=128, kv_block=128)
    logits = m.prefill(synthetic_prompt(n, tiny_cfg.vocab_size, 0), keep=list(range(n)))
    assert logits.shape == (n, tiny_cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.argmax(-1).unique().numel() > n // 4


# --- checkpoints -------------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tiny_cfg, tiny_weights):
    w = tiny_weights()
    d = save_checkpoint(w, tiny_cfg, tmp_path / "ckpt")
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    cfg2 = load_config(str(d))
    w2 = load_checkpoint(d, cfg2, torch.bfloat16, "cpu")
    assert w2.keys() == w.keys()
    for k in w:
        assert torch.equal(w[k], w2[k]), k
    prompt = synthetic_prompt(150, tiny_cfg.vocab_size, 3)
    keep = [10, 149]
    a = Runner(tiny_cfg, w, max_tokens=150, kv_aligned=1, chunk=64, kv_block=128).prefill(prompt, keep=keep)
    b = Runner(cfg2, w2, max_tokens=150, kv_aligned=1, chunk=64, kv_block=128).prefill(prompt, keep=keep)
    assert torch.equal(a, b)


def test_checkpoint_hash_is_stable_and_content_sensitive(tmp_path, tiny_cfg, tiny_weights):
    d1 = save_checkpoint(tiny_weights(), tiny_cfg, tmp_path / "a")
    d2 = save_checkpoint(tiny_weights(), tiny_cfg, tmp_path / "b")
    h = checkpoint_hash(d1)
    assert h.startswith("sha256:") and len(h) == len("sha256:") + 64
    assert checkpoint_hash(d1) == h == checkpoint_hash(d2)
    d3 = save_checkpoint(synthetic(tiny_cfg, 1, torch.bfloat16, "cpu"), tiny_cfg, tmp_path / "c")
    assert checkpoint_hash(d3) != h


def test_checkpoint_without_safetensors_is_an_error(tmp_path, tiny_cfg, tiny_weights):
    d = save_checkpoint(tiny_weights(), tiny_cfg, tmp_path / "ckpt")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_checkpoint(d, load_config(str(d)), torch.bfloat16, "cpu")


def test_checkpoint_missing_a_tensor_is_an_error(tmp_path, tiny_cfg, tiny_weights):
    from safetensors.torch import load_file, save_file

    d = save_checkpoint(tiny_weights(), tiny_cfg, tmp_path / "ckpt")
    t = load_file(str(d / "model.safetensors"))
    del t["model.norm.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(KeyError, match="model.norm.weight"):
        load_checkpoint(d, load_config(str(d)), torch.bfloat16, "cpu")


# --- prompts ------------------------------------------------------------------------------------------
def test_synthetic_prompt_deterministic_and_in_range():
    a = synthetic_prompt(1000, 2048, 5)
    assert torch.equal(a, synthetic_prompt(1000, 2048, 5))
    assert not torch.equal(a, synthetic_prompt(1000, 2048, 6))
    assert a.dtype == torch.int64 and a.shape == (1000,)
    assert int(a.min()) >= 0 and int(a.max()) < 2048
    assert a.unique().numel() > 300
    assert torch.equal(make_prompt("synthetic", 1000, 2048, 5), a)


def test_file_prompt_from_text_and_npy(tmp_path):
    txt = tmp_path / "ids.txt"
    txt.write_text("1, 2 3\n4,5\n\n6 7\n")
    assert file_prompt(txt, 6, 100).tolist() == [1, 2, 3, 4, 5, 6]
    npy = tmp_path / "ids.npy"
    np.save(npy, np.arange(20, dtype=np.int32).reshape(4, 5))
    ids = file_prompt(npy, 12, 100)
    assert ids.dtype == torch.int64 and ids.tolist() == list(range(12))
    assert make_prompt(str(npy), 12, 100, seed=0).tolist() == list(range(12))


def test_file_prompt_too_short_is_one_line_value_error(tmp_path):
    txt = tmp_path / "short.txt"
    txt.write_text("1 2 3")
    with pytest.raises(ValueError) as ei:
        file_prompt(txt, 4, 100)
    assert "\n" not in str(ei.value) and "ctx=4" in str(ei.value)


def test_file_prompt_out_of_vocab_is_refused(tmp_path):
    txt = tmp_path / "big.txt"
    txt.write_text("1 2 300")
    with pytest.raises(ValueError, match="outside"):
        file_prompt(txt, 3, 100)


# --- the ops interface: negative controls are wrappers ---------------------------------------------------
class _Recorder:
    """A stand-in backend that records the positions rope and attention were given."""

    def __init__(self):
        self.seen = []

    def rope(self, x, step):
        self.seen.append(("rope", step.decode, step.pos.tolist()))

    def decode_attention(self, q, kv, step):
        self.seen.append(("decode_attention", step.pos.tolist()))

    def prefill_attention(self, q, kv, step):
        self.seen.append(("prefill_attention", step.pos.tolist()))


@pytest.mark.parametrize("perturb,want", [
    ("none", [("rope", False, [5, 6]), ("rope", True, [7]), ("prefill_attention", [5, 6]), ("decode_attention", [7])]),
    ("rope_offset", [("rope", False, [5, 6]), ("rope", True, [8]), ("prefill_attention", [5, 6]),
                     ("decode_attention", [7])]),
    ("kv_off_by_one", [("rope", False, [5, 6]), ("rope", True, [7]), ("prefill_attention", [5, 6]),
                       ("decode_attention", [6])]),
])
def test_negative_controls_move_only_decode_positions(perturb, want):
    from greta.engine.ops import Step, with_control

    inner = _Recorder()
    ops = with_control(inner, perturb)
    assert (ops is inner) == (perturb == "none")
    pre = Step(torch.tensor([0, 1]), torch.tensor([5, 6]), False, [1])
    dec = Step(torch.tensor([2]), torch.tensor([7]), True, [0])
    ops.rope(None, pre)
    ops.rope(None, dec)
    ops.prefill_attention(None, None, pre)
    ops.decode_attention(None, None, dec)
    assert inner.seen == want
    assert dec.pos.tolist() == [7]  # the step itself is left as it was


# --- model sources -------------------------------------------------------------------------------------
def test_load_model_of_each_source(tiny_cfg, tmp_path):
    from greta.engine.source import check_model, load_model

    syn = load_model("tiny", 0, torch.float32, "cpu")
    assert syn.source == "synthetic" and syn.config is tiny_cfg and syn.model_hash == synthetic_hash(tiny_cfg, 0)
    d = save_checkpoint(syn.weights, tiny_cfg, tmp_path / "ck")
    check_model(str(d))
    ck = load_model(str(d), 0, torch.float32, "cpu")
    assert ck.source == "checkpoint" and ck.model_hash == checkpoint_hash(d)
    assert all(torch.equal(ck.weights[k], syn.weights[k]) for k in syn.weights)


def test_check_model_refuses_in_one_line(tmp_path):
    from greta.engine.source import check_model

    check_model("tiny")
    (tmp_path / "config.json").write_text("{}")
    for bad, what in [(str(tmp_path / "nope.gguf"), "no such GGUF file"), (str(tmp_path / "nothing"), "neither a preset"),
                      (str(tmp_path), "safetensors")]:
        with pytest.raises(ValueError) as e:
            check_model(bad)
        assert what in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_torch_backends_run_without_triton():
    """greta[gpu] (triton) is optional: the torch backends must import and run where `import triton` fails."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from greta.engine.config import PRESETS\nfrom greta.engine.runner import Runner\n"
            "from greta.engine.weights import synthetic\n"
            "cfg = PRESETS['tiny']; w = synthetic(cfg, 0, torch.float32, 'cpu')\n"
            "for kv in (0, 1):\n"
            "    m = Runner(cfg, w, max_tokens=40, kv_aligned=kv, chunk=16, kv_block=64)\n"
            "    assert m.prefill(torch.arange(20)).shape == (1, cfg.vocab_size)\n"
            "    assert m.decode(torch.tensor(3), 20).shape == (cfg.vocab_size,)\n"
            "assert sys.modules['triton'] is None\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
