"""Quantization-quality metrics on next-token distributions, as llama.cpp's `llama-perplexity --kl-divergence`.

Pure numpy; no model code (`speed_runs` times callables it is given). Rows are positions, columns the
vocabulary. "ref" is the reference model
(finetuned), "q" the variant under test.

- perplexity: exp(-mean log p(target)) over the scored (response) positions.
- KL divergence per position: KL(P_ref || Q) = sum_i p_i (log p_i - log q_i); mean, 99th percentile, max.
- top-1 agreement ("same top p"): share of positions where argmax Q == argmax P_ref.
- RMS Δp: root mean square of q(target) - p_ref(target), the change in the correct token's probability.

The reference is stored compactly (`top_k_summary`): its top-k log-probs with their token ids, the exact
log of the mass outside the top-k ("tail"), and the target's log-prob. `kld_top_k` then computes the KL
divergence between the two distributions coarse-grained to (top-k tokens of P_ref, one "rest" bucket). By the
data-processing inequality that is a lower bound on the exact KL divergence; the gap is
P_tail · KL(P_ref(·|tail) || Q(·|tail)), i.e. it only misses how the variant reshuffles the reference's
tail among itself, weighted by the tail's mass. With k = 256 of 49,152 the tail holds little mass on
response tokens; `kld_exact` (full distributions) is kept for the tests that bound the gap.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax, logsumexp

# Below this, a probability mass counts as zero (0 · log 0 = 0 in the KL sum).
_TINY = 1e-30


def log_probs(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (logits of any float dtype)."""
    return log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)


@dataclass(frozen=True)
class TopK:
    """A compact reference: per position the k most likely tokens, the rest's mass, and the target."""

    ids: np.ndarray        # (n, k) int32, most likely first
    logp: np.ndarray       # (n, k) float32 log-probs of `ids`
    tail_logp: np.ndarray  # (n,) float64 log of the probability mass outside `ids` (-inf when none)
    target_logp: np.ndarray  # (n,) float64 log-prob of the correct next token


def top_k_summary(logp: np.ndarray, targets: np.ndarray, k: int) -> TopK:
    """Summarise full log-probs `logp` (n, V) for the positions' correct tokens `targets` (n,)."""
    n, vocab = logp.shape
    k = min(k, vocab)
    part = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logp, part, axis=1), axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(logp, ids, axis=1)
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=1)
    tail = logsumexp(rest, axis=1) if k < vocab else np.full(n, -np.inf)
    return TopK(ids.astype(np.int32), top.astype(np.float32), tail.astype(np.float64),
                logp[np.arange(n), targets].astype(np.float64))


def kld_exact(ref_logp: np.ndarray, q_logp: np.ndarray) -> np.ndarray:
    """Per-position KL(P_ref || Q) from full log-probs (n, V)."""
    p = np.exp(ref_logp)
    return np.sum(np.where(p > _TINY, p * (ref_logp - q_logp), 0.0), axis=1)


def _bucket_term(p_logp: np.ndarray, q_logp: np.ndarray) -> np.ndarray:
    p = np.exp(p_logp)
    return np.where(p > _TINY, p * (p_logp - q_logp), 0.0)


def kld_top_k(ref: TopK, q_logp: np.ndarray) -> np.ndarray:
    """Per-position KL divergence of the (top-k of P_ref + rest) coarse-graining; a lower bound on the exact one."""
    q_top = np.take_along_axis(q_logp, ref.ids.astype(np.int64), axis=1)
    rest = q_logp.copy()
    np.put_along_axis(rest, ref.ids.astype(np.int64), -np.inf, axis=1)
    q_tail = logsumexp(rest, axis=1)
    top = _bucket_term(ref.logp.astype(np.float64), q_top).sum(axis=1)
    tail = _bucket_term(ref.tail_logp, q_tail)
    # Rounding can make a true zero come out as -1e-17; KL is never negative.
    return np.maximum(top + tail, 0.0)


def target_logp(q_logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return q_logp[np.arange(len(targets)), targets]


def perplexity(target_logps: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of the correct tokens."""
    if len(target_logps) == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(np.exp(-np.mean(target_logps)))


def compare(ref: TopK, q_logp: np.ndarray, targets: np.ndarray) -> dict:
    """Per-position arrays of the variant against the reference: kld, same_top1, delta_p, target_logp."""
    q_target = target_logp(q_logp, targets)
    return {
        "kld": kld_top_k(ref, q_logp),
        "same_top1": np.argmax(q_logp, axis=1) == ref.ids[:, 0],
        "delta_p": np.exp(q_target) - np.exp(ref.target_logp),
        "target_logp": q_target,
    }


def compare_logits(ref: TopK, logits: np.ndarray, targets: np.ndarray, chunk: int = 128) -> dict:
    """`compare` from raw logits, a few rows at a time in float64: the same numbers without ever holding a
    full-vocabulary log-prob array (the variant's tail mass is 1 - its top-k mass, which is exact once the row is
    normalised). What evaluate and search score every candidate with."""
    parts: dict[str, list[np.ndarray]] = {"kld": [], "same_top1": [], "delta_p": [], "target_logp": []}
    for s in range(0, len(logits), chunk):
        x = np.asarray(logits[s:s + chunk], dtype=np.float64)
        lse = logsumexp(x, axis=1)
        top = np.take_along_axis(x, ref.ids[s:s + chunk].astype(np.int64), axis=1) - lse[:, None]
        tail = np.log(np.clip(-np.expm1(logsumexp(top, axis=1)), _TINY, None))
        kld = (_bucket_term(ref.logp[s:s + chunk].astype(np.float64), top).sum(axis=1)
               + _bucket_term(ref.tail_logp[s:s + chunk], tail))
        q_target = x[np.arange(len(x)), targets[s:s + chunk]] - lse
        parts["kld"].append(np.maximum(kld, 0.0))
        parts["same_top1"].append(np.argmax(x, axis=1) == ref.ids[s:s + chunk, 0])
        parts["delta_p"].append(np.exp(q_target) - np.exp(ref.target_logp[s:s + chunk]))
        parts["target_logp"].append(q_target)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def summarize(per_position: dict[str, np.ndarray]) -> dict:
    """The llama-perplexity --kl-divergence statistics over all scored positions."""
    kld = per_position["kld"]
    if len(kld) == 0:
        raise ValueError("no positions to summarise")
    dp = per_position["delta_p"]
    return {
        "ppl": perplexity(per_position["target_logp"]),
        "kld_mean": float(np.mean(kld)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(np.max(kld)),
        "top1": float(np.mean(per_position["same_top1"])),
        "rms_dp": float(np.sqrt(np.mean(dp ** 2))),
        "positions": int(len(kld)),
    }


def speed_runs(pp: Callable[[], float], tg: Callable[[], float], runs: int) -> dict:
    """Prompt and generation tok/s the way llama-bench reports them: one untimed warm-up of each (pages in the
    weights, sizes the buffers), then the median of `runs` timed runs, with every run kept."""
    pp(), tg()
    pp_runs = [pp() for _ in range(runs)]
    tg_runs = [tg() for _ in range(runs)]
    return {"prompt_tps": statistics.median(pp_runs), "gen_tps": statistics.median(tg_runs),
            "prompt_tps_runs": pp_runs, "gen_tps_runs": tg_runs}


def repeats_ngram(text: str, n: int = 4, times: int = 3) -> bool:
    """Some word n-gram occurs `times` times or more: the looping ("Canada, Canada, Canada, …") that greedy
    decoding of an under-trained model falls into."""
    import re
    from collections import Counter

    words = re.findall(r"\w+", text.lower())  # punctuation and case do not make a loop new
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return any(c >= times for c in counts.values())
