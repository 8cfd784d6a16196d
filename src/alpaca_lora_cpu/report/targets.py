"""The project's targets (params.yaml `report`), each stated as met, missed or not measured with its numbers; and
the "best variant within a size" choices the report and the model registry use. Pure functions of the variants'
evaluate records (variant name → record with the metric_table names)."""
from __future__ import annotations

from collections.abc import Mapping

from alpaca_lora_cpu.config import ReportParams
from alpaca_lora_cpu.variants import BASE, FINETUNED, IMAT, SEARCHED, UNQUANTIZED, parse

Records = Mapping[str, Mapping]


def target(text: str, met: bool | None, numbers: str) -> dict:
    """One target: what it asks, met (True) / missed (False) / not measured (None), and the numbers behind it."""
    return {"target": text, "met": met, "numbers": numbers}


def base_targets(v: Records, goal: ReportParams) -> list[dict]:
    """Fine-tuned against base on the val split: response PPL, template leaks and repetition (raw answers)."""
    if BASE not in v:
        return [target("fine-tuned vs base (PPL, leaks, repetition)", None, "base not evaluated")]
    base, ft = v[BASE], v[FINETUNED]
    ratio = ft["ppl"] / base["ppl"]
    out = [target(f"fine-tuned response PPL ≤ {goal.ppl_ratio_max:g} × the base model's", ratio <= goal.ppl_ratio_max,
                  f"finetuned {ft['ppl']:.3f} vs base {base['ppl']:.3f} = {ratio:.3f}×")]
    for key, what in (("leak_rate", "answers that write an Alpaca header"),
                      ("loop_rate", "answers that repeat a 4-gram 3+ times")):
        out.append(target(f"fine-tuned {what}: no more than the base model's", ft[key] <= base[key],
                          f"finetuned {100 * ft[key]:.0f}% vs base {100 * base[key]:.0f}%"))
    return out


def level_targets(v: Records, goal: ReportParams, hf: Mapping) -> list[dict]:
    """q8_0 near-lossless, q4_0 faster than transformers fp32 (`hf`: the reference stage's speed record)."""
    out = []
    if "q8_0" in v:
        kld, top1 = v["q8_0"]["kld_mean"], v["q8_0"]["top1"]
        out.append(target(f"q8_0 mean KLD ≤ {goal.q8_max_kld}", kld <= goal.q8_max_kld, f"{kld:.4g}"))
        out.append(target(f"q8_0 top-1 agreement ≥ {goal.q8_min_top1:.0%}", top1 >= goal.q8_min_top1,
                          f"{100 * top1:.2f}%"))
    else:
        out.append(target("q8_0 KLD / top-1", None, "q8_0 not evaluated"))
    if "q4_0" in v and "gen_tps" in hf:
        q4 = v["q4_0"]["speed"]["gen_tps"]
        ratio = q4 / hf["gen_tps"]
        out.append(target(f"q4_0 generates ≥ {goal.q4_min_speedup:g}× faster than transformers fp32",
                          ratio >= goal.q4_min_speedup, f"{q4:.1f} vs {hf['gen_tps']:.1f} tok/s = {ratio:.2f}×"))
    else:
        out.append(target("q4_0 speed-up over transformers fp32", None,
                          f"transformers fp32 skipped: {hf['skipped']}" if "skipped" in hf else "q4_0 not evaluated"))
    return out


def best_within(v: Records, size_mb: float) -> str | None:
    """The quantized variant with the lowest mean KLD no larger than `size_mb` (None: none is that small)."""
    fits = {n: m for n, m in v.items() if n not in UNQUANTIZED and m["size_mb"] <= size_mb}
    return min(fits, key=lambda n: fits[n]["kld_mean"], default=None)


def imatrix_targets(v: Records, goal: ReportParams, recipes: Mapping) -> list[dict]:
    """What the imatrix buys per level, the best variant at q4_0's size, q4_k_m-imat, the searched recipe."""
    out = []
    for level in ("q4_0", "q4_k_m", "q2_k"):
        if level in v and level + IMAT in v:
            plain, imat = v[level]["kld_mean"], v[level + IMAT]["kld_mean"]
            cut = 1 - imat / plain
            out.append(target(f"the imatrix lowers {level}'s mean KLD by ≥ {goal.imatrix_min_kld_cut:.0%}",
                              cut >= goal.imatrix_min_kld_cut, f"{plain:.4f} → {imat:.4f} ({-100 * cut:+.0f}%)"))
        else:
            out.append(target(f"imatrix effect on {level}", None, f"{level} and {level}{IMAT} not both evaluated"))
    if "q4_0" in v:
        best = best_within(v, v["q4_0"]["size_mb"])
        out.append(target(f"best variant no larger than q4_0: mean KLD ≤ {goal.q4_0_size_max_kld:g}",
                          v[best]["kld_mean"] <= goal.q4_0_size_max_kld,
                          f"{best}: {v[best]['kld_mean']:.4f} at {v[best]['size_mb']:.1f} MB"))
    if "q4_k_m" + IMAT in v:
        kld = v["q4_k_m" + IMAT]["kld_mean"]
        out.append(target(f"q4_k_m{IMAT} mean KLD ≤ {goal.q4_k_m_imat_max_kld:g}", kld <= goal.q4_k_m_imat_max_kld,
                          f"{kld:.4f}"))
    if SEARCHED in v:
        out.append(search_target(v, SEARCHED, goal, recipes))
    return out


def search_target(v: Records, name: str, goal: ReportParams, recipes: Mapping) -> dict:
    """The searched recipe against every stock imatrix level no larger than it."""
    s = v[name]
    stock = {n for n in v if parse(n, recipes).imatrix and parse(n, recipes).recipe is None}
    rivals = {n: m for n, m in v.items() if n in stock and m["size_mb"] <= s["size_mb"]}
    if not rivals:
        return target(f"{name} recipe vs stock imatrix levels", None,
                      f"no stock imatrix level as small as the {name} recipe")
    best = min(rivals, key=lambda n: rivals[n]["kld_mean"])
    cut = 1 - s["kld_mean"] / rivals[best]["kld_mean"]
    return target(f"{name} recipe: mean KLD ≥ {goal.search_min_kld_cut:.0%} lower than every stock imatrix level "
                  "no larger", cut >= goal.search_min_kld_cut,
                  f"{name} {s['kld_mean']:.4f} at {s['size_mb']:.1f} MB vs {best} {rivals[best]['kld_mean']:.4f} at "
                  f"{rivals[best]['size_mb']:.1f} MB ({-100 * cut:+.0f}%)")


def all_targets(v: Records, goal: ReportParams, hf: Mapping, recipes: Mapping) -> list[dict]:
    return base_targets(v, goal) + level_targets(v, goal, hf) + imatrix_targets(v, goal, recipes)


def recommend(v: Records, quantized: set[str], max_mb: float) -> dict | None:
    """Among `quantized`, the variant with the lowest mean KLD within `max_mb`, with its flat numbers
    (metric_table), or None when none is that small."""
    from alpaca_lora_cpu.metric_table import BY_NAME, flat_paths, value

    best = best_within({n: m for n, m in v.items() if n in quantized}, max_mb)
    if best is None:
        return None
    return {"variant": best, "max_mb": max_mb, **{k: value(BY_NAME[k], v[best]) for k in flat_paths()}}
