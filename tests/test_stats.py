"""The record bootstrap (alpaca_lora_cpu/stats.py) against scipy's, and the paired comparisons on known cases."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap

from alpaca_lora_cpu import stats


def test_mean_interval_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.exponential(2.0, size=60)
    lo, hi = stats.ci(stats.ratio(x), resamples=20_000, confidence=0.95, seed=1)
    ref = bootstrap((x,), np.mean, n_resamples=20_000, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(2)).confidence_interval
    width = ref.high - ref.low
    # two Monte-Carlo estimates of the same interval: equal within a few percent of its width
    assert abs(lo - ref.low) < 0.05 * width and abs(hi - ref.high) < 0.05 * width
    assert lo < x.mean() < hi


def test_token_weighted_mean_resamples_records_not_tokens():
    # two records: 1 position with KLD 1, 99 positions with KLD 0 → mean 0.01; resampling records can give
    # 0 (the long record twice), 1 (the short one twice) or 0.01
    stat = stats.ratio([1.0, 0.0], [1.0, 99.0])
    assert stat.value() == pytest.approx(0.01)
    samples = stat.value(stats.counts(2, 4000, seed=0))
    assert set(np.round(np.unique(samples), 6)) == {0.0, 0.01, 1.0}


def test_ppl_transform_and_identical_variants_pair_to_exactly_one():
    nll = np.array([10.0, 20.0, 5.0, 7.0])
    n = np.array([5.0, 8.0, 3.0, 4.0])
    ppl = stats.ratio(-nll, n, "exp_neg")
    assert ppl.value() == pytest.approx(np.exp(nll.sum() / n.sum()))
    point, lo, hi = stats.paired(ppl, ppl, np.divide, 2000, 0.95, seed=0)
    assert (point, lo, hi) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))


def test_paired_interval_is_narrower_than_unpaired_when_records_vary_together():
    rng = np.random.default_rng(0)
    hard = rng.lognormal(0, 1, 50)          # how hard each record is, shared by both variants
    a = stats.ratio(hard * 1.0)
    b = stats.ratio(hard * 0.8 * rng.uniform(0.95, 1.05, 50))
    point, lo, hi = stats.paired(b, a, np.divide, 4000, 0.95, seed=0)
    assert lo < point < hi and hi < 0.9       # decided: b is lower
    alo, ahi = stats.ci(a, 4000, 0.95, seed=0)
    blo, bhi = stats.ci(b, 4000, 0.95, seed=0)
    assert blo < ahi                           # the two unpaired intervals overlap


def test_quantile_interval_matches_a_loop_over_resamples():
    rng = np.random.default_rng(5)
    record = np.repeat(np.arange(12), rng.integers(3, 9, 12))
    values = rng.exponential(1.0, len(record))
    lo, hi = stats.quantile_ci(values, record, 0.9, 300, 0.9, seed=4)
    c = stats.counts(12, 300, seed=4).astype(int)
    loop = []
    for row in c:
        pooled = np.sort(np.concatenate([np.repeat(values[record == i], k) for i, k in enumerate(row)]))
        loop.append(pooled[int(np.ceil(0.9 * len(pooled))) - 1])
    assert (lo, hi) == pytest.approx(stats.interval(np.array(loop), 0.9))


@pytest.mark.parametrize(("lo", "hi", "better", "expected"), [
    (0.1, 0.2, "low", True), (0.3, 0.4, "low", False), (0.2, 0.3, "low", None),
    (0.3, 0.4, "high", True), (0.1, 0.2, "high", False), (0.2, 0.3, "high", None),
    (0.25, 0.25, "low", True), (float("nan"), 0.1, "low", None),
])
def test_decide_needs_the_whole_interval_on_one_side(lo, hi, better, expected):
    assert stats.decide(lo, hi, 0.25, better) is expected


def test_unequal_records_cannot_be_paired():
    with pytest.raises(ValueError, match="same records"):
        stats.paired(stats.ratio([1.0, 2.0]), stats.ratio([1.0]), np.divide, 10, 0.95, 0)
