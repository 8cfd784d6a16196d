"""The metric math against values computed by hand on tiny distributions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from alpaca_lora_cpu.metrics import compare, kld_exact, kld_top_k, log_probs, perplexity, summarize, top_k_summary

# Two positions over a 3-token vocabulary. Position 0: the variant swaps the top two tokens' probabilities;
# position 1: identical distributions.
REF_P = np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
Q_P = np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]])
TARGETS = np.array([0, 2])
LN2 = math.log(2)


def as_logits(p, shift=0.0):
    # Any constant shift of logits is the same distribution: log_probs must undo it.
    return np.log(p) + shift


def test_log_probs_normalise_shifted_logits():
    lp = log_probs(as_logits(REF_P, shift=7.5))
    np.testing.assert_allclose(np.exp(lp), REF_P, atol=1e-12)


def test_kld_exact_by_hand():
    # KL = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln 1 = 0.25 ln 2; second position 0.
    kld = kld_exact(log_probs(as_logits(REF_P)), log_probs(as_logits(Q_P, 3.0)))
    np.testing.assert_allclose(kld, [0.25 * LN2, 0.0], atol=1e-12)


def test_full_top_k_is_exact():
    ref = log_probs(as_logits(REF_P))
    q = log_probs(as_logits(Q_P))
    summary = top_k_summary(ref, TARGETS, k=3)
    np.testing.assert_allclose(kld_top_k(summary, q), kld_exact(ref, q), atol=1e-7)
    assert np.all(np.isneginf(summary.tail_logp))


def test_top1_plus_tail_by_hand():
    # k=1: buckets (token 0, rest): P = (0.5, 0.5), Q = (0.25, 0.75)
    # KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    ref = log_probs(as_logits(REF_P))
    summary = top_k_summary(ref, TARGETS, k=1)
    np.testing.assert_array_equal(summary.ids[:, 0], [0, 2])
    np.testing.assert_allclose(summary.tail_logp, np.log([0.5, 0.3]), atol=1e-7)
    kld = kld_top_k(summary, log_probs(as_logits(Q_P)))
    assert kld[0] == pytest.approx(0.5 * LN2 + 0.5 * math.log(0.5 / 0.75), abs=1e-7)
    assert kld[1] == pytest.approx(0.0, abs=1e-7)


def test_top_k_lower_bound_and_close_on_random_logits():
    rng = np.random.default_rng(0)
    ref_logits = rng.normal(0, 3, size=(64, 500))
    q_logits = ref_logits + rng.normal(0, 0.1, size=ref_logits.shape)  # a "quantized" perturbation
    ref, q = log_probs(ref_logits), log_probs(q_logits)
    targets = rng.integers(0, 500, size=64)
    exact = kld_exact(ref, q)
    approx = kld_top_k(top_k_summary(ref, targets, k=64), q)
    assert np.all(approx <= exact + 1e-9)            # data-processing inequality
    assert approx.mean() > 0.5 * exact.mean()          # and not a trivial bound
    assert kld_top_k(top_k_summary(ref, targets, k=500), q) == pytest.approx(exact, abs=1e-6)


def test_summary_statistics_by_hand():
    ref = top_k_summary(log_probs(as_logits(REF_P)), TARGETS, k=2)
    stats = summarize(compare(ref, log_probs(as_logits(Q_P)), TARGETS))
    exact_kld0 = 0.25 * LN2
    # k=2 keeps tokens {0,1}/{2,1}: position 0's rest bucket is token 2 alone, so the result is exact here.
    assert stats["kld_mean"] == pytest.approx(exact_kld0 / 2, abs=1e-7)
    assert stats["kld_max"] == pytest.approx(exact_kld0, abs=1e-7)
    assert stats["kld_p99"] == pytest.approx(0.99 * exact_kld0, abs=1e-7)  # linear interpolation of 2 values
    assert stats["top1"] == 0.5                                 # argmax 1 vs 0, then 2 vs 2
    assert stats["rms_dp"] == pytest.approx(math.sqrt((0.25 ** 2 + 0) / 2))  # Δp = 0.25-0.5, 0.7-0.7
    assert stats["ppl"] == pytest.approx(1 / math.sqrt(0.25 * 0.7))       # q(target) = 0.25, 0.7
    assert stats["positions"] == 2


def test_perplexity_of_uniform_is_vocab_size():
    assert perplexity(np.log(np.full(10, 1 / 7))) == pytest.approx(7.0)
    with pytest.raises(ValueError):
        perplexity(np.array([]))
