"""The project's targets (params.yaml `report`), each decided on its 95% interval: **met** when the whole interval is
on the right side of the threshold, **missed** when all of it is on the wrong side, **undecided** otherwise (or not
measured). Every A-vs-B target is a paired bootstrap on the same records (alpaca_lora_cpu/stats.py); a single
variant's target uses its own record-bootstrap interval. Also the "best variant within a size" choices the report and
the model registry use. Pure functions of the variants' evaluate records and generation rows."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from alpaca_lora_cpu.config import IntervalParams, ReportParams
from alpaca_lora_cpu.intervals import statistics
from alpaca_lora_cpu.stats import Ratio, decide, paired
from alpaca_lora_cpu.variants import BASE, FINETUNED, GPTQ, IMAT, SEARCHED, UNQUANTIZED, parse

Records = Mapping[str, Mapping]
STATUS = {True: "met", False: "missed", None: "undecided"}
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Evidence:
    """What the targets are decided on: every variant's record, its statistics over records, the interval settings,
    the transformers speed record and which data the held-out records are from."""
    records: Records
    stats: Mapping[str, Mapping[str, Ratio]]
    iv: IntervalParams
    hf: Mapping
    distribution: str

    @classmethod
    def of(cls, records: Records, generations: Mapping[str, list], iv: IntervalParams, hf: Mapping,
           distribution: str) -> Evidence:
        return cls(records, {v: statistics(m, generations.get(v, [])) for v, m in records.items()}, iv, hf,
                   distribution)

    def pair(self, a: str, b: str, metric: str, compare: Callable) -> tuple[float, float, float]:
        return paired(self.stats[a][metric], self.stats[b][metric], compare, self.iv.resamples, self.iv.confidence,
                      self.iv.seed)

    def single(self, v: str, metric: str) -> tuple[float, float, float]:
        lo, hi = self.records[v]["ci"][metric]
        return float(self.stats[v][metric].value()), lo, hi


def target(text: str, status: str, numbers: str) -> dict:
    """One target: what it asks, met / missed / undecided / not measured, and the numbers behind it."""
    return {"target": text, "status": status, "numbers": numbers}


def judged(text: str, estimate: tuple[float, float, float], threshold: float, better: str, fmt: str,
           what: str = "") -> dict:
    point, lo, hi = estimate
    return target(text, STATUS[decide(lo, hi, threshold, better)],
                  f"{what}{fmt.format(point)} [{fmt.format(lo)}, {fmt.format(hi)}]")


def ratio_of(a, b):
    return a / b


def difference(a, b):
    return a - b


def base_targets(e: Evidence, goal: ReportParams) -> list[dict]:
    """Fine-tuned against base on the held-out records: response PPL, template leaks, repetition and instruction
    following, each a paired comparison, labelled with the data it was scored on."""
    on = f" (on {e.distribution})"
    if BASE not in e.records:
        return [target("fine-tuned vs base (PPL, leaks, repetition, instruction following)", NOT_MEASURED,
                       "base not evaluated")]
    r = e.records
    out = [judged(f"fine-tuned response PPL ≤ {goal.ppl_ratio_max:g} × the base model's{on}",
                  e.pair(FINETUNED, BASE, "ppl", ratio_of), goal.ppl_ratio_max, "low", "{:.3f}×",
                  f"finetuned {r[FINETUNED]['ppl']:.3f} vs base {r[BASE]['ppl']:.3f}: ")]
    for key, what in (("leak_rate", "answers that write an Alpaca header"),
                      ("loop_rate", "answers that repeat a 4-gram 3+ times")):
        out.append(judged(f"fine-tuned {what}: no more than the base model's (difference ≤ 0)",
                          e.pair(FINETUNED, BASE, key, difference), 0.0, "low", "{:+.1%}",
                          f"finetuned {r[FINETUNED][key]:.0%} vs base {r[BASE][key]:.0%}: "))
    if "if_prompt_strict" in e.stats[FINETUNED] and "if_prompt_strict" in e.stats[BASE]:
        ft, base = r[FINETUNED]["if_prompt_strict"], r[BASE]["if_prompt_strict"]
        out.append(judged("fine-tuned instruction following (prompt-level strict) no worse than the base model's "
                          f"(difference ≥ {-goal.if_max_drop:+.0%})", e.pair(FINETUNED, BASE, "if_prompt_strict",
                                                                          difference),
                          -goal.if_max_drop, "high", "{:+.1%}", f"finetuned {ft:.1%} vs base {base:.1%}: "))
    else:
        out.append(target("fine-tuned instruction following vs base", NOT_MEASURED, "no instruction-following prompts"))
    return out


def speedup(q: Mapping, hf: Mapping) -> tuple[float, float, float]:
    """q4_0 ÷ transformers generation tok/s: the ratio of medians, between the slowest and fastest pairing of the
    timed runs (speed has no records to resample; the runs' range is its interval)."""
    qs, hs = q["speed"]["gen_tps_runs"], hf["gen_tps_runs"]
    return q["speed"]["gen_tps"] / hf["gen_tps"], min(qs) / max(hs), max(qs) / min(hs)


def level_targets(e: Evidence, goal: ReportParams) -> list[dict]:
    """q8_0 near-lossless, q4_0 faster than transformers fp32."""
    out = []
    if "q8_0" in e.records:
        out.append(judged(f"q8_0 mean KLD ≤ {goal.q8_max_kld}", e.single("q8_0", "kld_mean"), goal.q8_max_kld,
                          "low", "{:.4g}"))
        out.append(judged(f"q8_0 top-1 agreement ≥ {goal.q8_min_top1:.0%}", e.single("q8_0", "top1"),
                          goal.q8_min_top1, "high", "{:.2%}"))
    else:
        out.append(target("q8_0 KLD / top-1", NOT_MEASURED, "q8_0 not evaluated"))
    if "q4_0" in e.records and "gen_tps" in e.hf:
        q4 = e.records["q4_0"]["speed"]["gen_tps"]
        out.append(judged(f"q4_0 generates ≥ {goal.q4_min_speedup:g}× faster than transformers fp32 (range of runs)",
                          speedup(e.records["q4_0"], e.hf), goal.q4_min_speedup, "high", "{:.2f}×",
                          f"{q4:.1f} vs {e.hf['gen_tps']:.1f} tok/s: "))
    else:
        out.append(target("q4_0 speed-up over transformers fp32", NOT_MEASURED,
                          f"transformers fp32 skipped: {e.hf['skipped']}" if "skipped" in e.hf
                          else "q4_0 not evaluated"))
    return out


def best_within(v: Records, size_mb: float) -> str | None:
    """The quantized variant with the lowest mean KLD no larger than `size_mb` (None: none is that small)."""
    fits = {n: m for n, m in v.items() if n not in UNQUANTIZED and m["size_mb"] <= size_mb}
    return min(fits, key=lambda n: fits[n]["kld_mean"], default=None)


def imatrix_targets(e: Evidence, goal: ReportParams, recipes: Mapping) -> list[dict]:
    """What the imatrix buys per level (paired KLD ratio), the best variant at q4_0's size, q4_k_m-imat, the
    searched recipe."""
    v, out = e.records, []
    keep = 1 - goal.imatrix_min_kld_cut
    for level in ("q4_0", "q4_k_m", "q2_k"):
        if level in v and level + IMAT in v:
            out.append(judged(f"the imatrix lowers {level}'s mean KLD by ≥ {goal.imatrix_min_kld_cut:.0%} "
                              f"(KLD ratio ≤ {keep:.2f})", e.pair(level + IMAT, level, "kld_mean", ratio_of), keep,
                              "low", "{:.3f}×",
                              f"{v[level]['kld_mean']:.4f} → {v[level + IMAT]['kld_mean']:.4f}: "))
        else:
            out.append(target(f"imatrix effect on {level}", NOT_MEASURED, f"{level} and {level}{IMAT} not both "
                              "evaluated"))
    if "q4_0" in v:
        best = best_within(v, v["q4_0"]["size_mb"])
        out.append(judged(f"best variant no larger than q4_0: mean KLD ≤ {goal.q4_0_size_max_kld:g}",
                          e.single(best, "kld_mean"), goal.q4_0_size_max_kld, "low", "{:.4f}",
                          f"{best} at {v[best]['size_mb']:.1f} MB: "))
    fmt = {n: m for n, m in v.items() if parse(n, recipes).level == "q4_0" and parse(n, recipes).recipe is None}
    if fmt:
        best = min(fmt, key=lambda n: fmt[n]["kld_mean"])
        out.append(judged(f"best level in the tutorial's q4_0 format ({', '.join(fmt)}): mean KLD ≤ "
                          f"{goal.q4_0_format_max_kld:g}", e.single(best, "kld_mean"), goal.q4_0_format_max_kld,
                          "low", "{:.4f}", f"{best}: "))
    if "iq4_nl" + GPTQ in v:
        out.append(judged(f"iq4_nl{GPTQ} mean KLD ≤ {goal.iq4_nl_gptq_max_kld:g}",
                          e.single("iq4_nl" + GPTQ, "kld_mean"), goal.iq4_nl_gptq_max_kld, "low", "{:.4f}"))
    if "q4_k_m" + IMAT in v:
        out.append(judged(f"q4_k_m{IMAT} mean KLD ≤ {goal.q4_k_m_imat_max_kld:g}", e.single("q4_k_m" + IMAT,
                                                                                           "kld_mean"),
                          goal.q4_k_m_imat_max_kld, "low", "{:.4f}"))
    if SEARCHED in v:
        out.append(search_target(e, SEARCHED, goal, recipes))
    return out


def search_target(e: Evidence, name: str, goal: ReportParams, recipes: Mapping) -> dict:
    """The searched recipe against the best stock imatrix level no larger than it (paired KLD ratio)."""
    v, s = e.records, e.records[name]
    stock = {n for n in v if parse(n, recipes).imatrix and parse(n, recipes).recipe is None}
    rivals = {n: m for n, m in v.items() if n in stock and m["size_mb"] <= s["size_mb"]}
    text = (f"{name} recipe: mean KLD ≥ {goal.search_min_kld_cut:.0%} lower than every stock imatrix level no "
            f"larger (KLD ratio ≤ {1 - goal.search_min_kld_cut:.2f})")
    if not rivals:
        return target(text, NOT_MEASURED, f"no stock imatrix level as small as the {name} recipe")
    best = min(rivals, key=lambda n: rivals[n]["kld_mean"])
    return judged(text, e.pair(name, best, "kld_mean", ratio_of), 1 - goal.search_min_kld_cut, "low", "{:.3f}×",
                  f"{name} {s['kld_mean']:.4f} at {s['size_mb']:.1f} MB vs {best} {rivals[best]['kld_mean']:.4f} at "
                  f"{rivals[best]['size_mb']:.1f} MB: ")


def all_targets(e: Evidence, goal: ReportParams, recipes: Mapping) -> list[dict]:
    return base_targets(e, goal) + level_targets(e, goal) + imatrix_targets(e, goal, recipes)


def counts(goals: list[dict]) -> dict[str, int]:
    return {f"targets_{s.replace(' ', '_')}": sum(g["status"] == s for g in goals)
            for s in (*STATUS.values(), NOT_MEASURED)}


def recommend(v: Records, quantized: set[str], max_mb: float) -> dict | None:
    """Among `quantized`, the variant with the lowest mean KLD within `max_mb`, with its flat numbers
    (metric_table), or None when none is that small."""
    from alpaca_lora_cpu.metric_table import BY_NAME, flat_paths, value

    best = best_within({n: m for n, m in v.items() if n in quantized}, max_mb)
    if best is None:
        return None
    return {"variant": best, "max_mb": max_mb, **{k: value(BY_NAME[k], v[best]) for k in flat_paths()}}
