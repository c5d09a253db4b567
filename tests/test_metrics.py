"""greta.record.metrics: compare() on hand-made logits, and the verdict exactly at its thresholds."""
from __future__ import annotations

import math

import numpy as np
import pytest

from greta.record.metrics import VERDICTS, compare, equivalence_verdict

TH = {"max_abs_diff": 5e-3, "p99_abs_diff": 1e-3, "top1_agreement": 0.999}


def cmp(decode, reference, tokens=None):
    d = np.asarray(decode, dtype=np.float32)
    span = d.shape[0]
    tokens = list(np.asarray(reference, dtype=np.float32).argmax(-1)) if tokens is None else tokens
    return compare(d, np.asarray(reference, dtype=np.float32), tokens, list(range(99, 99 + span)),
                   ["prefill"] + ["decode"] * (span - 1))


# --- compare -----------------------------------------------------------------------------------------
def test_identical_is_bit_exact():
    r = np.array([[1.0, 2.0, 3.0], [3.0, -1.0, 0.5]], dtype=np.float32)
    m = cmp(r.copy(), r)
    assert m["bit_exact"] and m["finite"] and m["tokens_agree"]
    assert m["max_abs_diff"] == m["p99_abs_diff"] == m["mean_abs_diff"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["first_argmax_mismatch"] is None
    assert m["cosine_min"] == pytest.approx(1.0) and m["cosine_mean"] == pytest.approx(1.0)
    assert (m["span"], m["vocab"], m["distinct_argmax"]) == (2, 3, 2)


def test_hand_computed_differences():
    ref = np.array([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]], dtype=np.float32)
    dec = ref.copy()
    dec[1, 0] = 2.5    # |d| 0.5, argmax unchanged
    dec[2, 2] = 4.0    # |d| 4.0, argmax moves 3 -> 2
    m = cmp(dec, ref)
    diffs = np.zeros(12)
    diffs[4], diffs[10] = 0.5, 4.0
    assert not m["bit_exact"] and m["finite"]
    assert m["max_abs_diff"] == 4.0
    assert m["mean_abs_diff"] == pytest.approx(4.5 / 12)
    assert m["p99_abs_diff"] == pytest.approx(np.quantile(diffs, 0.99))
    assert m["top1_agreement"] == pytest.approx(2 / 3)
    assert m["first_argmax_mismatch"] == 2
    assert m["tokens_agree"]  # tokens given = reference argmaxes
    # cosine of row 2: (9) / (3 * 5)
    assert m["cosine_min"] == pytest.approx(9 / 15)
    rows = m["per_position"]
    assert len(rows) == 3
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["position"] for r in rows] == [99, 100, 101]
    assert [r["source"] for r in rows] == ["prefill", "decode", "decode"]
    assert [r["max_abs_diff"] for r in rows] == [0.0, 0.5, 4.0]
    assert [r["agree"] for r in rows] == [True, True, False]
    assert (rows[2]["argmax_decode"], rows[2]["argmax_reference"]) == (2, 3)
    assert rows[1]["mean_abs_diff"] == pytest.approx(0.125)


def test_one_ulp_is_not_bit_exact():
    r = np.array([[1.0, 2.0]], dtype=np.float32)
    d = r.copy()
    d[0, 1] = np.nextafter(np.float32(2.0), np.float32(3.0))
    m = cmp(d, r)
    assert not m["bit_exact"]
    assert 0 < m["max_abs_diff"] < 1e-6


def test_tokens_that_disagree_with_reference_argmax():
    r = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    m = cmp(r, r, tokens=[1, 1])
    assert m["bit_exact"] and not m["tokens_agree"]


def test_nan_is_not_finite_and_not_bit_exact():
    r = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    d = r.copy()
    d[1, 1] = np.nan
    m = cmp(d, r)
    assert m["finite"] is False and m["bit_exact"] is False
    # NaN in both at the same place is still not "bit exact" evidence of equivalence
    m2 = cmp(d, d.copy())
    assert m2["finite"] is False and m2["bit_exact"] is False


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        compare(np.zeros((2, 3)), np.zeros((2, 4)), [0, 0], [0, 1], ["prefill", "decode"])


# --- verdict -----------------------------------------------------------------------------------------
def m_(max_abs=0.0, p99=0.0, top1=1.0, finite=True, bit_exact=False):
    return {"max_abs_diff": max_abs, "p99_abs_diff": p99, "top1_agreement": top1, "finite": finite,
            "bit_exact": bit_exact}


def above(x):
    return math.nextafter(x, math.inf)


def below(x):
    return math.nextafter(x, -math.inf)


def test_exactly_at_every_threshold_passes():
    v, reason = equivalence_verdict(m_(5e-3, 1e-3, 0.999), 1, TH)
    assert v == "PASS_EQUIV", reason
    assert "\n" not in reason


def test_zero_diff_passes():
    assert equivalence_verdict(m_(bit_exact=True), 1, TH)[0] == "PASS_EQUIV"


@pytest.mark.parametrize("kw,key", [
    (dict(max_abs=above(5e-3), p99=1e-3, top1=0.999), "max_abs_diff"),
    (dict(max_abs=5e-3, p99=above(1e-3), top1=0.999), "p99_abs_diff"),
    (dict(max_abs=5e-3, p99=1e-3, top1=below(0.999)), "top1_agreement"),
], ids=["max", "p99", "top1"])
def test_just_past_one_threshold_fails(kw, key):
    v, reason = equivalence_verdict(m_(**kw), 1, TH)
    assert v == "FAIL_EQUIV"
    assert key in reason and "\n" not in reason
    others = {"max_abs_diff", "p99_abs_diff", "top1_agreement"} - {key}
    assert not any(f"{o} >" in reason or f"{o} <" in reason for o in others)


def test_several_failures_are_all_named():
    v, reason = equivalence_verdict(m_(1.0, 1.0, 0.5), 1, TH)
    assert v == "FAIL_EQUIV"
    assert "max_abs_diff >" in reason and "p99_abs_diff >" in reason and "top1_agreement <" in reason


def test_thresholds_come_from_the_params():
    loose = {"max_abs_diff": 1.0, "p99_abs_diff": 1.0, "top1_agreement": 0.5}
    assert equivalence_verdict(m_(0.9, 0.9, 0.5), 1, loose)[0] == "PASS_EQUIV"
    assert equivalence_verdict(m_(0.9, 0.9, 0.5), 1, TH)[0] == "FAIL_EQUIV"


@pytest.mark.parametrize("metrics", [m_(), m_(10.0, 10.0, 0.0), m_(bit_exact=True)])
def test_unaligned_is_always_expected_drift(metrics):
    v, reason = equivalence_verdict(metrics, 0, TH)
    assert v == "EXPECTED_DRIFT" and "kv_aligned=0" in reason


def test_non_finite_fails_even_with_nan_figures():
    # NaN compares False against every threshold: the finite flag must catch it
    v, reason = equivalence_verdict(m_(float("nan"), float("nan"), 1.0, finite=False), 1, TH)
    assert v == "FAIL_EQUIV" and "non-finite" in reason


def test_verdict_from_real_compare_with_nan():
    r = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    d = r.copy()
    d[0, 0] = np.nan
    assert equivalence_verdict(cmp(d, r), 1, TH)[0] == "FAIL_EQUIV"


def test_verdict_names_are_the_documented_ones(repo_root):
    doc = (repo_root / "docs" / "RECORD.md").read_text()
    for v in VERDICTS:
        assert v in doc


def test_non_finite_is_a_failure_even_unaligned():
    v, reason = equivalence_verdict(m_(float("nan"), float("nan"), 1.0, finite=False), 0, TH)
    assert v == "FAIL_EQUIV" and "non-finite" in reason
