"""Each per-variant figure as a statistic over records (alpaca_lora_cpu/stats.py), from one evaluate record and its
generation rows, and the 95% intervals the evaluate stage publishes and the report prints.

- Scored metrics (PPL, KLD mean, top-1, RMS Δp) come from the record's `per_record` sums: one entry per held-out
  record, in the reference's order, so two variants' statistics pair record by record.
- Answer metrics (ROUGE-L, stop/leak/repeat rates, answer length, instruction following) come from the generation
  rows, one per prompt, in the reference's prompt order.
- Speed has no records: its interval is the range of the timed runs. Size and bits per weight are exact.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from alpaca_lora_cpu.stats import Ratio, ci, ratio

IFEVAL = "ifeval"  # the generation rows' kind for the instruction-following prompts

SCORED = ("ppl", "kld_mean", "top1", "rms_dp")
ANSWERS = ("rouge_l", "stop_rate", "leak_rate", "loop_rate", "answer_tokens",
           "if_prompt_strict", "if_inst_strict", "if_prompt_loose", "if_inst_loose")
RUNS = {"prompt_tps": "prompt_tps_runs", "gen_tps": "gen_tps_runs"}


def scored(per_record: Mapping) -> dict[str, Ratio]:
    n = per_record["positions"]
    return {"ppl": ratio(per_record["logp"], n, "exp_neg"), "kld_mean": ratio(per_record["kld"], n),
            "top1": ratio(per_record["top1"], n), "rms_dp": ratio(per_record["dp2"], n, "sqrt")}


def answers(rows: Sequence[Mapping]) -> dict[str, Ratio]:
    """The answer statistics that have rows (no ROUGE without val prompts, no IF scores without IF prompts)."""
    if not rows:
        return {}
    out = {"stop_rate": ratio([r["eos"] for r in rows]), "leak_rate": ratio([r["leak"] for r in rows]),
           "loop_rate": ratio([r["loop"] for r in rows]), "answer_tokens": ratio([r["tokens"] for r in rows])}
    val = [r["rouge_l"] for r in rows if r.get("rouge_l") is not None]
    if val:
        out["rouge_l"] = ratio(val)
    checked = [r[IFEVAL] for r in rows if r.get(IFEVAL)]
    for mode in ("strict", "loose") if checked else ():
        out[f"if_prompt_{mode}"] = ratio([all(c[mode]) for c in checked])
        out[f"if_inst_{mode}"] = ratio([sum(c[mode]) for c in checked], [len(c[mode]) for c in checked])
    return out


def statistics(record: Mapping, rows: Sequence[Mapping]) -> dict[str, Ratio]:
    return {**scored(record["per_record"]), **answers(rows)}


def point(stats: Mapping[str, Ratio]) -> dict[str, float]:
    return {k: float(s.value()) for k, s in stats.items()}


def intervals(stats: Mapping[str, Ratio], speed: Mapping, resamples: int, confidence: float,
              seed: int) -> dict[str, list[float]]:
    """name → [lo, hi]: the record bootstrap for every statistic, the range of the timed runs for speed."""
    out = {k: list(ci(s, resamples, confidence, seed)) for k, s in stats.items()}
    for name, runs in RUNS.items():
        if runs in speed:
            out[name] = [float(np.min(speed[runs])), float(np.max(speed[runs]))]
    return out
