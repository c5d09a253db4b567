"""A peer engine's verdict (greta.record.metrics.equivalence_verdict with engine not greta, docs/ENGINES.md): held
to bit-exactness, what Greta's kv_aligned=1 gives. PASS_EQUIV when its decode is bit-identical to its own prefill
at every compared position, else ENGINE_DRIFT with the figures and the first differing position. The negative
control pair runs B3.77's own phases (greta.probe.b3_77_worker) in this process through two fake adapters on the
same logits function: one whose decode computes exactly what its prefill computes (PASS_EQUIV), one whose decode
is one float32 ulp off at one position (ENGINE_DRIFT); the real transformers adapter is measured too."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from greta.probe.kinds import kind_named
from greta.record.metrics import compare, equivalence_verdict, first_differing
from greta.record.params import load_params

TH = {"max_abs_diff": 5e-3, "p99_abs_diff": 1e-3, "top1_agreement": 0.999}


def _metrics(decode, reference):
    span = decode.shape[0]
    return compare(decode, reference, list(reference.argmax(-1)), list(range(99, 99 + span)),
                   ["prefill"] + ["decode"] * (span - 1))


def test_peer_verdict_is_bit_exactness_not_the_thresholds():
    ref = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    assert equivalence_verdict(_metrics(ref.copy(), ref), 0, TH, "hf")[0] == "PASS_EQUIV"
    off = ref.copy()
    off[2, 5] = np.nextafter(off[2, 5], np.float32(np.inf))  # one ulp: far inside Greta's kv1 thresholds
    m = _metrics(off, ref)
    assert equivalence_verdict(m, 1, TH)[0] == "PASS_EQUIV"  # Greta at kv1: within thresholds
    v, reason = equivalence_verdict(m, 0, TH, "hf")
    assert v == "ENGINE_DRIFT" and "first at step 2, position 101" in reason and "engine=hf" in reason
    assert "max_abs_diff=" in reason and "p99_abs_diff=" in reason and "top1_agreement=1.0000" in reason
    assert first_differing(m)["step"] == 2 and first_differing(_metrics(ref.copy(), ref)) is None
    bad = ref.copy()
    bad[0, 0] = np.nan
    assert equivalence_verdict(_metrics(bad, ref), 0, TH, "hf")[0] == "FAIL_EQUIV"  # non-finite: never drift


def test_engine_drift_is_a_complete_result_exit_0():
    kind = kind_named("b3_77")
    assert "ENGINE_DRIFT" in kind.verdicts and kind.ok("ENGINE_DRIFT") and kind.exit_code("ENGINE_DRIFT") == 0
    assert kind.exit_code("FAIL_EQUIV") == 1


class _FakeCache:
    capacity = 64

    def __init__(self):
        self.ids: list[int] = []

    def reset(self, b=None):
        self.ids = []

    def nbytes(self):
        return 0


class FakeEngine:
    """A deterministic engine: the logits at a position are a function of that token and the one before, the same
    float32 ops in prefill (row by row) and decode. skew: (step, amount) added to one decode step's logits."""

    def __init__(self, vocab: int, skew=None):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab, vocab, generator=g)
        self.cache, self.skew, self.ctx = _FakeCache(), skew, None

    def _row(self, ids: list[int], pos: int) -> torch.Tensor:
        prev = ids[pos - 1] if pos else 0
        return self.table[ids[pos]] + 0.5 * self.table[prev]

    def prefill(self, tokens, start=0, keep=None, progress=None, seq=0):
        self.cache.ids = [int(t) for t in tokens]
        self.ctx = self.ctx or len(self.cache.ids)
        keep = [len(self.cache.ids) - 1] if keep is None else keep
        return torch.stack([self._row(self.cache.ids, p) for p in keep])

    def decode(self, token, pos):
        self.cache.ids.append(int(token))
        out = self._row(self.cache.ids, pos)
        if self.skew and pos - self.ctx + 1 == self.skew[0]:
            out = out + self.skew[1]
        return out


def _run_phases(engine, p) -> tuple[str, str]:
    """B3.77's prefill, decode and reference phases on `engine`, judged as the record would be."""
    from greta.probe.b3_77_worker import B377Job

    job = B377Job(p, send=lambda msg: None)
    job.model, job.prompt = engine, torch.arange(p.ctx) % 50
    job.prefill()
    job.decode()
    ref = job.reference()
    m = compare(ref["decode_logits"], ref["reference_logits"], ref["tokens"], ref["positions"],
                ["prefill"] + ["decode"] * (p.span - 1))
    return equivalence_verdict(m, p.kv_aligned, p.thresholds.to_dict(), p.engine)


def test_negative_control_a_bit_exact_peer_passes_and_a_drifting_one_does_not():
    p = load_params(None, {"engine": "hf", "kv_aligned": 0, "ctx": 16, "gen": 6, "span": 4})
    assert _run_phases(FakeEngine(64), p)[0] == "PASS_EQUIV"
    v, reason = _run_phases(FakeEngine(64, skew=(2, 1e-6)), p)
    assert v == "ENGINE_DRIFT" and "first at step 2, position 17" in reason


def test_the_transformers_adapter_gets_a_peer_verdict(hf_checkpoint):
    """The real hf adapter through the same phases gets a peer's verdict (bit-exact or ENGINE_DRIFT), never
    EXPECTED_DRIFT; on SmolLM2 it drifts (tests/test_peers.py, slow; the committed engine sweep)."""
    pytest.importorskip("accelerate")
    from greta.engine.peers import make_engine
    from greta.engine.source import load_config

    d = hf_checkpoint("peer")
    p = load_params(None, {"engine": "hf", "kv_aligned": 0, "ctx": 24, "gen": 6, "span": 4, "model": str(d),
                           "dtype": "float32"})
    eng = make_engine("hf", str(d), load_config(str(d)), torch.float32, torch.device("cpu"), 32)
    v, reason = _run_phases(eng, p)
    assert v in ("PASS_EQUIV", "ENGINE_DRIFT") and reason.startswith("engine=hf: its decode"), reason
