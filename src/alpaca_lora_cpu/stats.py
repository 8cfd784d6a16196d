"""Intervals by bootstrap over records, and paired comparisons on the same records.

Every per-variant figure is a ratio of per-record sums: a mean over response positions (KLD, top-1, Δp², NLL)
is sum(per-record sums) / sum(per-record positions); a share of answers is sum(passes) / answers. A bootstrap
resample draws records (not tokens: tokens of one answer are not independent) with replacement, as a count per
record, so every statistic of a resample is `counts @ numerator / counts @ denominator`. The counts depend only
on (seed, number of records), so two variants scored on the same records are resampled identically: their
difference or ratio per resample is the paired bootstrap. Intervals are percentile intervals.

Pure numpy; tests/test_stats.py checks it against scipy.stats.bootstrap.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# A quantile over positions (KLD p99) holds counts × positions floats per chunk of resamples: cap the chunk.
_QUANTILE_CELLS = 20_000_000


@dataclass(frozen=True)
class Ratio:
    """A statistic sum(num) / sum(den) over records, then `transform` (exp for PPL, sqrt for RMS)."""
    num: np.ndarray
    den: np.ndarray
    transform: str = "identity"  # identity | exp_neg (PPL from log-probs) | sqrt

    def value(self, counts: np.ndarray | None = None) -> np.ndarray | float:
        if counts is None:
            return _apply(self.transform, self.num.sum() / self.den.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            return _apply(self.transform, (counts @ self.num) / (counts @ self.den))


def _apply(transform: str, x):
    if transform == "exp_neg":
        return np.exp(-x)
    if transform == "sqrt":
        return np.sqrt(x)
    return x


def ratio(num, den=None, transform: str = "identity") -> Ratio:
    num = np.asarray(num, dtype=np.float64)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or len(num) == 0:
        raise ValueError(f"per-record sums must be two equal, non-empty vectors, got {num.shape} and {den.shape}")
    return Ratio(num, den, transform)


def counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) draw counts of each record: the same for every statistic on the same n records."""
    rng = np.random.default_rng([seed, n])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (resamples where the statistic is undefined are dropped)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return float("nan"), float("nan")
    a = (1 - confidence) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return float(lo), float(hi)


def ci(stat: Ratio, resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    return interval(stat.value(counts(len(stat.num), resamples, seed)), confidence)


def paired(a: Ratio, b: Ratio, compare: Callable[[np.ndarray, np.ndarray], np.ndarray], resamples: int,
           confidence: float, seed: int) -> tuple[float, float, float]:
    """compare(a, b) on the full data and its paired-bootstrap interval: (point, lo, hi). a and b must be
    per-record sums over the same records, in the same order."""
    if len(a.num) != len(b.num):
        raise ValueError(f"a paired comparison needs the same records: {len(a.num)} against {len(b.num)}")
    c = counts(len(a.num), resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = float(compare(np.asarray(a.value()), np.asarray(b.value())))
        lo, hi = interval(compare(a.value(c), b.value(c)), confidence)
    return point, lo, hi


def quantile_ci(values: np.ndarray, record: np.ndarray, q: float, resamples: int, confidence: float,
                seed: int) -> tuple[float, float]:
    """Interval of the q-quantile of per-position `values`, resampling the records (`record`: each position's
    record index, 0..n-1). Weighted quantile per resample, in chunks that bound memory."""
    values, record = np.asarray(values, dtype=np.float64), np.asarray(record)
    n = int(record.max()) + 1
    c = counts(n, resamples, seed)
    order = np.argsort(values, kind="stable")
    v, r = values[order], record[order]
    chunk = max(1, _QUANTILE_CELLS // max(1, len(v)))
    out = []
    for s in range(0, resamples, chunk):
        w = np.cumsum(c[s:s + chunk][:, r], axis=1)
        target = q * w[:, -1:]
        idx = np.minimum((w < target).sum(axis=1), len(v) - 1)
        out.append(v[idx])
    return interval(np.concatenate(out), confidence)


def decide(lo: float, hi: float, threshold: float, better: str) -> bool | None:
    """A target against an interval: True (met) when the whole interval is on the right side of `threshold`,
    False (missed) when all of it is on the wrong side, None (undecided) otherwise. `better`: "low" (the value
    must be at most the threshold) or "high" (at least)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    if better == "low":
        return True if hi <= threshold else False if lo > threshold else None
    if better == "high":
        return True if lo >= threshold else False if hi < threshold else None
    raise ValueError(f"better must be 'low' or 'high', got {better!r}")
