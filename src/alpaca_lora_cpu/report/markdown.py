"""reports/report.md as text: the variants table (from metric_table), the targets, the quantization section,
the answers side by side and the environment. Pure functions of the report's inputs."""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

from alpaca_lora_cpu.metric_table import METRICS, formatted
from alpaca_lora_cpu.report.inputs import Inputs
from alpaca_lora_cpu.report.targets import best_within
from alpaca_lora_cpu.variants import AR, BASE, FINETUNED, GPTQ, IMAT, twin

COMPARE_VARIANTS = (FINETUNED, "q4_0", "q2_k")  # answers to the first showcase prompt, side by side
MARKS = {"met": "**met**", "missed": "**missed**", "undecided": "*undecided*", "not measured": "not measured"}
PACKAGES = ("torch", "transformers", "numpy", "rouge-score", "gguf", "dvc", "mlflow")


def table(rows: list[dict]) -> str:
    """One row per variant, one column per metric_table row; each figure with its 95% interval where it has one."""
    head = "| variant | " + " | ".join(m.header for m in METRICS) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in METRICS) + " |"
    body = ["| " + " | ".join([r["variant"], *(formatted(m, r[m.name], r["ci"].get(m.name)) for m in METRICS)])
            + " |" for r in rows]
    return "\n".join([head, sep, *body])


def targets(goals: list[dict], counted: dict[str, int]) -> list[str]:
    summary = ", ".join(f"{n} {k.removeprefix('targets_').replace('_', ' ')}" for k, n in counted.items())
    return [f"{summary} (95% intervals; paired bootstrap over the same records for every comparison).", "",
            *[f"- {MARKS[g['status']]}: {g['target']} — {g['numbers']}" for g in goals]]


def _pct(row: dict, key: str) -> str:
    v, ci = row.get(key), row["ci"].get(key)
    return "–" if v is None else f"{100 * v:.0f} [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def instruction_following(rows: list[dict], paired: dict[str, tuple], ref: dict) -> str:
    """Prompt- and instruction-level accuracy (strict and loose) per variant, and each variant's paired difference
    in prompt-level strict accuracy: fine-tuned against base, every quantized level against finetuned."""
    if not any(r.get("if_prompt_strict") is not None for r in rows):
        return "No instruction-following prompts were answered (reference.ifeval_prompts)."
    lines = [f"{ref['ifeval_prompts']} prompts of data/ifeval/prompts.jsonl ({ref['ifeval_instructions']} "
             "instructions in IFEval's vocabulary: word limits, bullet counts, JSON, keywords, endings, case, "
             "paragraphs, …), answered greedily and checked by if-verifiable (IFEval's rules). Strict: the answer as "
             "cut at the stop sequences; loose: also with its first/last line or markdown asterisks removed.", "",
             "| variant | prompt strict % | instruction strict % | prompt loose % | instruction loose % | "
             "prompt strict: paired difference |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        d = paired.get(r["variant"])
        diff = "–" if d is None else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] vs {d[3]}"
        cells = [_pct(r, k) for k in ("if_prompt_strict", "if_inst_strict", "if_prompt_loose", "if_inst_loose")]
        lines.append(f"| {r['variant']} | {' | '.join(cells)} | {diff} |")
    if paired.get(FINETUNED, (None,) * 4)[3] == BASE:
        point, lo, hi, _ = paired[FINETUNED]
        verdict = ("**Fine-tuning made instruction following worse**" if hi < 0 else
                   "Fine-tuning made instruction following better" if lo > 0 else
                   "No difference in instruction following between fine-tuned and base is decided")
        lines += ["", f"{verdict}: prompt-level strict accuracy {100 * point:+.1f} points [{100 * lo:+.1f}, "
                      f"{100 * hi:+.1f}] (fine-tuned − base, paired over the same prompts)."]
    return "\n".join(lines)


def against_plain(v: dict[str, dict]) -> dict[str, str]:
    """Each imatrix (<level>-imat), AutoRound (<level>-ar) and GPTQ (<level>-gptq, <recipe>-gptq) variant → the
    llama.cpp file it rounds another way (variants.twin), where both were evaluated: the pairs the quantization
    table compares."""
    return {name: twin(name) for name in v if twin(name) in v}


def quantization_section(v: dict[str, dict], budgets: tuple[str, ...], calibration: dict, search: dict,
                         changes: dict[str, tuple[float, float, float]] | None = None,
                         seconds: dict[str, float] | None = None) -> str:
    """Per level, llama.cpp's plain rounding against the imatrix's, AutoRound's and GPTQ's at the same level
    (`changes`: each variant's paired KLD ratio ÷ plain with its interval), the recommendation per size budget,
    the calibration set and the search; `seconds`: each variant's quantize time (its quantize@ stage's record)."""
    changes, seconds = changes or {}, seconds or {}

    def took(name: str) -> str:
        return f"{seconds[name]:.0f}" if name in seconds else "–"
    lines = [f"Importance matrix: {calibration.get('tokens', '?')} tokens ({calibration.get('chunks', '?')} "
             f"records) of `{calibration.get('calibration_source', '?')}` (sha256 "
             f"`{str(calibration.get('calibration_sha256', '?'))[:16]}…`), disjoint from the val split scored here. "
             "AutoRound (`-ar`) calibrates on the same text; GPTQ (`-gptq`) rounds over the input covariances "
             "the same pass collected.",
             "", "| level | rounding | size MB | KLD plain | KLD | change (paired 95%) | PPL plain | PPL | "
             "top-1 % plain | top-1 % | quantize s plain | quantize s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, level in against_plain(v).items():
        m, plain = v[name], v[level]
        point, lo, hi = changes.get(name, (m["kld_mean"] / plain["kld_mean"], float("nan"), float("nan")))
        change = f"{100 * (point - 1):+.0f}%" + (f" [{100 * (lo - 1):+.0f}, {100 * (hi - 1):+.0f}]"
                                                 if lo == lo else "")
        how = "imatrix" if name.endswith(IMAT) else "GPTQ" if name.endswith(GPTQ) else "AutoRound"
        lines.append(f"| {level} | {how} | {m['size_mb']:.1f} | {plain['kld_mean']:.4f} | {m['kld_mean']:.4f} | "
                     f"{change} | {plain.get('ppl', float('nan')):.3f} | {m.get('ppl', float('nan')):.3f} | "
                     f"{100 * plain['top1']:.1f} | {100 * m['top1']:.1f} | {took(level)} | {took(name)} |")
    if not any(name.endswith(AR) for name in v):
        lines += ["", "AutoRound (`-ar`): no level in quantize.types, so none in this table (why it is not a default: "
                      "params.yaml's quantize.types note, make bench-autoround in docs/benchmarks.md); add `q4_0-ar` "
                      "to quantize.types to compare it here."]
    lines += ["", "Best variant (lowest mean KLD) within each size:", ""]
    for budget in budgets:
        if budget in v:
            best = best_within(v, v[budget]["size_mb"])
            lines.append(f"- ≤ {budget} ({v[budget]['size_mb']:.1f} MB): **{best}**, {v[best]['size_mb']:.1f} MB, "
                         f"KLD {v[best]['kld_mean']:.4f}, top-1 {100 * v[best]['top1']:.1f}%")
    if search:
        lines += ["", f"Search (stage `search`): {search['candidates']} candidates measured on "
                      f"{search['calibration_tokens']} train-split tokens in {search['seconds']:.0f} s, budget "
                      f"{search['budget_mib']:.1f} MiB; winner {search['winner_mib']:.1f} MiB, calibration KLD "
                      f"{search['winner_kld']:.4f} (predicted {search['winner_predicted_kld']:.4f})"
                      + (f"; {search['gptq_types']:.0f} type(s) rounded by GPTQ once each, in "
                         f"{search['gptq_seconds']:.0f} s" if search.get("gptq_types") else "") + ". Its recipe: "
                      "models/search/recipe.json; every candidate: reports/search/candidates.csv."]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def showcase(inputs: Inputs) -> str:
    """Base and fine-tuned answers to the fixed prompts; the first prompt across a few quantization levels."""
    def answers(v: str) -> dict[int, dict]:
        return {r["id"]: r for r in inputs.generations.get(v, []) if r["kind"] == "showcase"}

    ft = answers(FINETUNED)
    base = answers(BASE) if BASE in inputs.variants else {}
    lines = ["| prompt | base | finetuned |", "| --- | --- | --- |"]
    for i, row in sorted(ft.items()):
        b = base.get(i, {}).get("text", "*(base not evaluated)*")
        lines.append(f"| {_cell(row['instruction'] or '')} | {_cell(b)} | {_cell(row['text'])} |")
    present = [v for v in COMPARE_VARIANTS if v in inputs.variants]
    first = min(ft) if ft else None
    if first is not None:
        lines += ["", f"The same first prompt, *{ft[first]['instruction']}*, across quantization levels:", "",
                  "| " + " | ".join(present) + " |", "| " + " | ".join("---" for _ in present) + " |",
                  "| " + " | ".join(_cell(answers(v)[first]["text"]) for v in present) + " |"]
    return "\n".join(lines)


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment(inputs: Inputs) -> dict:
    from alpaca_lora_cpu.cpu import read as read_cpu

    any_variant = next(iter(inputs.variants.values()))
    return {
        "cpu": read_cpu().model, "cpu_count": os.cpu_count(), "threads": any_variant["speed"]["threads"],
        "python": platform.python_version(), "platform": platform.platform(),
        **any_variant["llama_cpp"], **{p: _pkg(p) for p in PACKAGES},
    }


READING = ("Reading it: ΔPPL and KLD measure how far a variant's next-token distributions move from finetuned "
           "(0 for finetuned itself); top-1 % is how often it picks the same most likely token; RMS Δp is the "
           "typical change in the correct token's probability. base is a different model, so its KLD is what "
           "fine-tuning changed, not quantization error. EOS-stop, leak and repeats are shares of the greedy answers "
           "before any stop sequence cuts them: ended with EOS within the limit, wrote an Alpaca header (ran on into "
           "a new turn), repeated a 4-gram 3 or more times; answer tokens is their mean length. The answers shown "
           "below are cut at the stop sequences, as `make generate` prints them.")


def render(inputs: Inputs, rows: list[dict], goals: list[dict], figures: dict[str, str], loss_note: str,
           quantization: str = "", following: str = "") -> str:
    from alpaca_lora_cpu.report.targets import counts

    ref, hf = inputs.reference, inputs.reference["hf_fp32"]
    any_v = next(iter(inputs.variants.values()))
    s = any_v["speed"]
    out = [
        "# Evaluation report", "",
        f"Run `{ref['run_id']}`: {ref['records']} held-out records of {ref.get('val_source', '?')}, "
        f"{ref['positions']} response tokens scored (prompt masked); KLD, top-1 and Δp against finetuned "
        f"(llama.cpp logits of the reference GGUF, top-{ref['top_k']} + exact rest mass, see docs/stages.md); greedy "
        f"answers to {ref['generate_prompts']} validation, {ref['showcase_prompts']} fixed and "
        f"{ref.get('ifeval_prompts', 0)} instruction-following prompts, at "
        f"most {any_v['max_new_tokens']} new tokens. Every figure has its 95% interval in brackets: a bootstrap over "
        "records (PPL, KLD, top-1, Δp) or answers (rates, ROUGE-L, IF accuracy); for speed, the range of the runs. "
        f"Speed: llama-cpp-python, {s['threads']} threads, median of {s['runs']} runs after a warm-up, "
        f"prompt {s['prompt_tokens']} tokens, generation {s['gen_tokens']} tokens.", "",
        "## Targets", "",
        *targets(goals, counts(goals)), "",
        "## Variants", "", table(rows), "",
        (f"transformers fp32 `generate` on models/merged ({hf['threads']} threads): prompt "
         f"{hf['prompt_tps']:.0f} tok/s, generation {hf['gen_tps']:.1f} tok/s, load {hf['load_s']:.2f} s."
         if "skipped" not in hf else f"transformers fp32 speed not measured: {hf['skipped']}."), "",
        READING, "",
        *(["## Quantization: importance matrix, i-quants, recipes", "", quantization, ""] if quantization else []),
        "## Plots", "",
        f"![quality against size]({figures['quality']})", "",
        f"![generation speed against size]({figures['speed']})", "",
        f"![training loss]({figures['loss']})" if "loss" in figures else loss_note, "",
        *(["## Instruction following", "", following, ""] if following else []),
        "## Base vs fine-tuned", "", showcase(inputs), "",
        "## Environment", "",
        *[f"- {k}: `{v}`" for k, v in environment(inputs).items()], "",
    ]
    return "\n".join(out)
