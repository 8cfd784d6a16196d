"""report: the imatrix / i-quant / recipe part — plain vs imatrix per level, the best variant per size, targets."""
from __future__ import annotations

import numpy as np
import pytest

from alpaca_lora_cpu.config import IntervalParams, RecipeParams, ReportParams
from alpaca_lora_cpu.intervals import intervals, scored
from alpaca_lora_cpu.report.markdown import quantization_section
from alpaca_lora_cpu.report.targets import Evidence, best_within, imatrix_targets, recommend
from alpaca_lora_cpu.variants import parse

GOAL = ReportParams(q8_max_kld=0.005, q8_min_top1=0.95, q4_min_speedup=5.0, ppl_ratio_max=0.95,
                    imatrix_min_kld_cut=0.25, q4_0_size_max_kld=0.10, q4_0_format_max_kld=0.075, if_max_drop=0.0,
                    q4_k_m_imat_max_kld=0.04, iq4_nl_gptq_max_kld=0.065,
                    search_min_kld_cut=0.15, budget_variants=("q4_0", "q4_k_m", "q8_0"), recommend_max_mb=100)
IV = IntervalParams(resamples=1000, confidence=0.95, seed=0)
# 40 held-out records of 20 positions; how hard each record is, shared by every variant (what pairing exploits)
HARD = np.random.default_rng(0).lognormal(0, 0.5, 40)


def m(size, kld, top1=0.8, noise=0.0, seed=1):
    """An evaluate record whose per-record KLD sums average `kld` (times the shared hardness, times its own noise)."""
    own = np.random.default_rng(seed).lognormal(0, noise, 40) if noise else np.ones(40)
    per = HARD * own
    per_record = {"positions": [20] * 40, "kld": list(20 * kld * per / per.mean()), "logp": [-20.0] * 40,
                  "top1": [round(20 * top1)] * 40, "dp2": [0.2] * 40}
    record = {"size_mb": size, "kld_mean": kld, "top1": top1, "per_record": per_record}
    record["ci"] = intervals(scored(per_record), {}, IV.resamples, IV.confidence, IV.seed)
    return record


def evidence(variants):
    return Evidence.of(variants, {}, IV, {}, "the test records")


EMB = {"emb-q4": RecipeParams(type="iq4_nl", imatrix=True, token_embedding="q4_0", output=None, overrides={})}


VARIANTS = {
    "base": m(270, 0.9), "finetuned": m(270, 1e-9, 1.0), "q8_0": m(145, 0.004, 0.97),
    "q4_k_m": m(105, 0.055), "q4_0": m(92, 0.30), "q2_k": m(88, 0.41),
    "q4_k_m-imat": m(105, 0.032), "q4_0-imat": m(92, 0.18), "q2_k-imat": m(88, 0.33),
    "iq4_xs-imat": m(91, 0.09), "searched": m(91.5, 0.06),
}


def test_kinds_by_name():
    assert [parse(v, EMB).kind for v in ("finetuned", "q4_0", "q4_0-imat", "iq4_xs-imat", "emb-q4", "searched")] == \
        ["reference", "plain", "imatrix", "i-quant", "recipe", "recipe"]


def test_best_within_a_size_ignores_base_and_reference():
    assert best_within(VARIANTS, 92) == "searched" and best_within(VARIANTS, 91) == "iq4_xs-imat"
    assert best_within(VARIANTS, 145) == "q8_0"


def test_recommendation_is_the_lowest_kld_quantized_variant_within_the_budget():
    quantized = set(VARIANTS) - {"base", "finetuned"}
    rec = recommend(VARIANTS, quantized, 100)
    assert rec["variant"] == "searched" and (rec["kld_mean"], rec["size_mb"], rec["max_mb"]) == (0.06, 91.5, 100)
    assert recommend(VARIANTS, quantized, 91)["variant"] == "iq4_xs-imat"
    assert recommend(VARIANTS, quantized, 150)["variant"] == "q8_0"
    assert recommend(VARIANTS, quantized - {"q8_0"}, 300)["variant"] == "q4_k_m-imat"  # never the reference
    assert recommend(VARIANTS, quantized, 50) is None


def test_targets_state_each_cut_and_which_fail():
    goals = {g["target"].split(" (")[0]: g for g in imatrix_targets(evidence(VARIANTS), GOAL, {})}
    q4 = goals["the imatrix lowers q4_0's mean KLD by ≥ 25%"]
    # the same records get 40% less KLD: the paired ratio is 0.6 on every resample
    assert q4["status"] == "met" and q4["numbers"] == "0.3000 → 0.1800: 0.600× [0.600×, 0.600×]"
    assert goals["the imatrix lowers q2_k's mean KLD by ≥ 25%"]["status"] == "missed"  # 0.41 → 0.33 is -20%
    best = goals["best variant no larger than q4_0: mean KLD ≤ 0.1"]
    assert best["numbers"].startswith("searched at 91.5 MB: 0.0600 [") and best["status"] == "met"
    assert goals["q4_k_m-imat mean KLD ≤ 0.04"]["status"] == "met"
    search = next(g for t, g in goals.items() if t.startswith("searched recipe"))
    # the stock -imat rivals no larger than 91.5 MB: iq4_xs-imat (0.09) and q2_k-imat; 0.06 is 33% below 0.09
    assert search["status"] == "met" and "vs iq4_xs-imat 0.0900" in search["numbers"]
    assert search["numbers"].endswith("0.667× [0.667×, 0.667×]")


def test_a_cut_near_its_threshold_with_unshared_noise_is_undecided():
    noisy = {**VARIANTS, "q4_k_m-imat": m(105, 0.055 * 0.76, noise=0.8, seed=7)}
    goals = {g["target"].split(" (")[0]: g for g in imatrix_targets(evidence(noisy), GOAL, {})}
    cut = goals["the imatrix lowers q4_k_m's mean KLD by ≥ 25%"]
    lo, hi = (float(x.rstrip("×]")) for x in cut["numbers"].split("[")[1].split(", "))
    assert cut["status"] == "undecided" and lo < 0.75 < hi


def test_missing_pairs_are_not_measured_not_missed():
    goals = imatrix_targets(evidence({"finetuned": m(270, 0.001), "q4_0": m(92, 0.3)}), GOAL, {})
    assert [g["status"] for g in goals[:3]] == ["not measured"] * 3


def test_section_names_the_calibration_and_recommends_per_budget():
    text = quantization_section(VARIANTS, GOAL.budget_variants,
                                {"tokens": 19000, "chunks": 160, "calibration_source": "train",
                                 "calibration_sha256": "ab" * 32}, {})
    assert "19000 tokens (160 records) of `train`" in text
    assert "| q4_0 | imatrix | 92.0 | 0.3000 | 0.1800 | -40% |" in text  # no paired interval: the point alone
    assert "AutoRound (`-ar`): no level in quantize.types" in text  # the table says why it has no AutoRound row
    with_ar = {**VARIANTS, "q4_0-ar": m(92, 0.12)}
    paired = quantization_section(with_ar, GOAL.budget_variants, {}, {},
                                  {"q4_0-imat": (0.6, 0.55, 0.66), "q4_0-ar": (0.4, 0.35, 0.45)})
    assert "| q4_0 | imatrix | 92.0 | 0.3000 | 0.1800 | -40% [-45, -34] |" in paired
    assert "| q4_0 | AutoRound | 92.0 | 0.3000 | 0.1200 | -60% [-65, -55] |" in paired
    assert "| q2_k | AutoRound" not in paired  # no q2_k-ar evaluated
    assert "no level in quantize.types" not in paired
    with_gptq = {**with_ar, "q4_0-gptq": m(92, 0.09)}
    table = quantization_section(with_gptq, GOAL.budget_variants, {}, {}, seconds={"q4_0": 1.2, "q4_0-gptq": 113.4})
    assert "| q4_0 | GPTQ | 92.0 | 0.3000 | 0.0900 | -70% |" in table
    gptq_row = next(line for line in table.splitlines() if line.startswith("| q4_0 | GPTQ"))
    ar_row = next(line for line in table.splitlines() if line.startswith("| q4_0 | AutoRound"))
    assert gptq_row.endswith("| 1 | 113 |") and ar_row.endswith("| 1 | – |")  # the quantize time, where recorded
    assert "- ≤ q4_0 (92.0 MB): **searched**" in text and "- ≤ q8_0 (145.0 MB): **q8_0**" in text


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_cut_params_are_shares(bad):
    with pytest.raises(ValueError, match="report.imatrix_min_kld_cut must be in"):
        ReportParams(**{**GOAL.__dict__, "imatrix_min_kld_cut": bad})


def test_the_q4_0_format_target_takes_the_best_of_plain_imatrix_and_autoround():
    assert parse("q4_0-ar", {}).kind == "autoround"
    goals = {g["target"].split(" (")[0]: g for g in imatrix_targets(evidence(VARIANTS), GOAL, {})}
    fmt = goals["best level in the tutorial's q4_0 format"]
    assert fmt["status"] == "missed" and fmt["numbers"].startswith("q4_0-imat: 0.1800 [")  # 0.18 > 0.075
    ar = {**VARIANTS, "q4_0-ar": m(92, 0.05)}
    goals = {g["target"].split(" (")[0]: g for g in imatrix_targets(evidence(ar), GOAL, {})}
    fmt = goals["best level in the tutorial's q4_0 format"]
    assert fmt["status"] == "met" and fmt["numbers"].startswith("q4_0-ar: 0.0500 [")
    assert "q4_0, q4_0-imat, q4_0-ar" in fmt["target"]


def test_the_gptq_levels_count_in_the_q4_0_format_target_and_iq4_nl_gptq_has_its_own():
    assert parse("q4_0-gptq", {}).kind == "gptq" and parse("iq4_nl-gptq", {}).level == "iq4_nl"
    v = {**VARIANTS, "q4_0-gptq": m(92, 0.07), "iq4_nl-gptq": m(92.1, 0.08)}
    goals = {g["target"].split(" (")[0]: g for g in imatrix_targets(evidence(v), GOAL, {})}
    fmt = goals["best level in the tutorial's q4_0 format"]
    assert fmt["numbers"].startswith("q4_0-gptq: 0.0700 [") and "q4_0-gptq" in fmt["target"]
    iq4 = goals["iq4_nl-gptq mean KLD ≤ 0.065"]
    assert iq4["status"] in ("missed", "undecided") and iq4["numbers"].startswith("0.0800")
    assert "iq4_nl-gptq mean KLD ≤ 0.065" not in {g["target"] for g in imatrix_targets(evidence(VARIANTS), GOAL, {})}
