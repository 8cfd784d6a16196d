"""report: reports/report.md with PNG plots beside it, from the evaluate metrics of every variant.

Run: python -m stages.report --params params.yaml --evaluated reports/metrics/evaluate \
         --reference reports/metrics/reference.json --generations reports/evaluate --loss reports/plots/finetune \
         --out reports/report.md --figures reports/figures --table reports/plots/evaluate.csv \
         --metrics reports/metrics/report.json --imatrix-metrics reports/metrics/imatrix.json \
         --search-metrics reports/metrics/search.json --finetune-metrics reports/metrics/finetune.json \
         --gguf-dir models/gguf

The table (a row per variant), the quality/size and speed/size plots, the training loss curve, base vs
fine-tuned answers to the fixed prompts, the environment, and each target of the project stated as met or
missed with its numbers. Refuses metrics from different pipeline runs (their `run_id`s differ from the
reference's) and names any variant without metrics. It reads each stage's whole record from the
`*.details.json` beside its metrics file.

Onto the pipeline's MLflow parent run it logs the headline metrics (`eval_loss`, `<variant>.kld_mean`, …), the
report, the figures, params.yaml and dvc.lock, and the recommended model (lowest mean KLD within
report.recommend_max_mb) with its Modelfile, registered as a new version of the MLflow model
`alpaca-lora-cpu-gguf`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import REFERENCE_VARIANT, EvaluateParams, ReportParams, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, read_details, read_json, read_jsonl, write_csv, write_text
from alpaca_lora_cpu.tracking import REGISTERED_MODEL

log = logging.getLogger("report")
BASE_VARIANT = "base"
COMPARE_VARIANTS = (REFERENCE_VARIANT, "q4_0", "q2_k")  # answers to the first showcase prompt
COLUMNS = [  # (csv key, table header, format)
    ("variant", "variant", "{}"), ("size_mb", "size MB", "{:.1f}"), ("bits_per_weight", "bits/w", "{:.2f}"),
    ("ppl", "PPL", "{:.3f}"), ("delta_ppl", "ΔPPL vs finetuned", "{:+.3f}"), ("kld_mean", "KLD mean", "{:.4g}"),
    ("kld_p99", "KLD p99", "{:.4g}"), ("top1_pct", "top-1 %", "{:.2f}"), ("rms_dp_pct", "RMS Δp %", "{:.2f}"),
    ("rouge_l", "ROUGE-L", "{:.3f}"), ("eos_pct", "EOS-stop %", "{:.0f}"), ("leak_pct", "leak %", "{:.0f}"),
    ("repeat_pct", "repeats %", "{:.0f}"), ("answer_tokens", "answer tokens", "{:.0f}"),
    ("prompt_tps", "prompt tok/s", "{:.0f}"), ("gen_tps", "gen tok/s", "{:.1f}"), ("load_s", "load s", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
]


@dataclass(frozen=True)
class Inputs:
    reference: dict
    variants: dict[str, dict]         # variant -> evaluate metrics, in evaluate.variants order
    generations: dict[str, list[dict]]


def load_inputs(variants: list[str], evaluated: Path, reference: Path, generations: Path) -> Inputs:
    ref = read_details(reference, "reference metrics")
    found = {v: read_details(evaluated / f"{v}.json", f"variant {v}: metrics", f"run `dvc repro evaluate@{v}`")
             for v in variants}
    mismatched = [(v, m.get("run_id")) for v, m in found.items() if m.get("run_id") != ref["run_id"]]
    if mismatched:
        v, rid = mismatched[0]
        raise StageError(f"metrics from different pipeline runs: {evaluated / (v + '.details.json')} has run_id {rid}, "
                         f"{reference} has {ref['run_id']} ({len(mismatched)} of {len(found)} variants differ); "
                         f"rerun the evaluate stages (dvc repro)")
    gens = {v: read_jsonl(generations / f"{v}.generations.jsonl", f"variant {v}: generations",
                          f"run `dvc repro evaluate@{v}`") for v in variants}
    return Inputs(ref, found, gens)


def table_rows(inputs: Inputs) -> list[dict]:
    f16_ppl = inputs.variants[REFERENCE_VARIANT]["ppl"]
    rows = []
    for v, m in inputs.variants.items():
        s = m["speed"]
        rows.append({
            "variant": v, "size_mb": m["size_mb"], "bits_per_weight": m["bits_per_weight"], "ppl": m["ppl"],
            "delta_ppl": m["ppl"] - f16_ppl, "kld_mean": m["kld_mean"], "kld_p99": m["kld_p99"],
            "top1_pct": 100 * m["top1_agreement"], "rms_dp_pct": 100 * m["rms_delta_p"],
            "rouge_l": m["rouge_l_f1"] if m["rouge_l_f1"] is not None else float("nan"),
            "eos_pct": 100 * m["eos_stop_rate"], "leak_pct": 100 * m["template_leak_rate"],
            "repeat_pct": 100 * m["repetition_rate"], "answer_tokens": m["mean_answer_tokens"],
            "prompt_tps": s["prompt_tps"], "gen_tps": s["gen_tps"],
            "load_s": s["load_s"], "peak_rss_mb": s["peak_rss_mb"],
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "| " + " | ".join("---" if k == "variant" else "---:" for k, _, _ in COLUMNS) + " |"
    body = ["| " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def base_targets(v: dict[str, dict], goal: ReportParams) -> list[dict]:
    """Fine-tuned against base on the val split: response PPL, template leaks and repetition (raw answers)."""
    if BASE_VARIANT not in v:
        return [{"target": "fine-tuned vs base (PPL, leaks, repetition)", "met": None,
                 "numbers": "base not evaluated"}]
    base, ft = v[BASE_VARIANT], v[REFERENCE_VARIANT]
    ratio = ft["ppl"] / base["ppl"]
    out = [{"target": f"fine-tuned response PPL ≤ {goal.ppl_ratio_max:g} × the base model's",
            "met": ratio <= goal.ppl_ratio_max,
            "numbers": f"finetuned {ft['ppl']:.3f} vs base {base['ppl']:.3f} = {ratio:.3f}×"}]
    for key, what in (("template_leak_rate", "answers that write an Alpaca header"),
                      ("repetition_rate", "answers that repeat a 4-gram 3+ times")):
        out.append({"target": f"fine-tuned {what}: no more than the base model's", "met": ft[key] <= base[key],
                    "numbers": f"finetuned {100 * ft[key]:.0f}% vs base {100 * base[key]:.0f}%"})
    return out


def targets(inputs: Inputs, goal: ReportParams) -> list[dict]:
    """Each target of the project (params.yaml `report`): met / missed / not measured, with the numbers."""
    v, hf = inputs.variants, inputs.reference["hf_fp32"]
    out = []
    out += base_targets(v, goal)
    if "q8_0" in v:
        kld, top1 = v["q8_0"]["kld_mean"], v["q8_0"]["top1_agreement"]
        out.append({"target": f"q8_0 mean KLD ≤ {goal.q8_max_kld}", "met": kld <= goal.q8_max_kld,
                    "numbers": f"{kld:.4g}"})
        out.append({"target": f"q8_0 top-1 agreement ≥ {goal.q8_min_top1:.0%}", "met": top1 >= goal.q8_min_top1,
                    "numbers": f"{100 * top1:.2f}%"})
    else:
        out.append({"target": "q8_0 KLD / top-1", "met": None, "numbers": "q8_0 not evaluated"})
    if "q4_0" in v:
        q4 = v["q4_0"]["speed"]["gen_tps"]
        ratio = q4 / hf["gen_tps"]
        out.append({"target": f"q4_0 generates ≥ {goal.q4_min_speedup:g}× faster than transformers fp32",
                    "met": ratio >= goal.q4_min_speedup,
                    "numbers": f"{q4:.1f} vs {hf['gen_tps']:.1f} tok/s = {ratio:.2f}×"})
    else:
        out.append({"target": "q4_0 speed-up over transformers fp32", "met": None, "numbers": "q4_0 not evaluated"})
    return out


IMAT = "-imat"
KINDS = {  # kind → (marker, colour, legend)
    "plain": ("o", "tab:blue", "llama.cpp level"),
    "imatrix": ("^", "tab:green", "level + imatrix"),
    "i-quant": ("D", "tab:purple", "i-quant + imatrix"),
    "recipe": ("*", "tab:red", "recipe / searched"),
    "reference": ("s", "black", "finetuned (reference)"),
}


def kind(variant: str, recipes: set[str]) -> str:
    if variant == REFERENCE_VARIANT:
        return "reference"
    if variant in recipes:
        return "recipe"
    if variant.startswith("iq"):
        return "i-quant"
    return "imatrix" if variant.endswith(IMAT) else "plain"


def imatrix_targets(v: dict[str, dict], goal: ReportParams, recipes: set[str]) -> list[dict]:
    """Issue-13 targets: what the imatrix buys per level, the best variant at q4_0's size, the searched recipe."""
    out = []
    for level in ("q4_0", "q4_k_m", "q2_k"):
        if level in v and level + IMAT in v:
            plain, imat = v[level]["kld_mean"], v[level + IMAT]["kld_mean"]
            cut = 1 - imat / plain
            out.append({"target": f"the imatrix lowers {level}'s mean KLD by ≥ {goal.imatrix_min_kld_cut:.0%}",
                        "met": cut >= goal.imatrix_min_kld_cut,
                        "numbers": f"{plain:.4f} → {imat:.4f} ({-100 * cut:+.0f}%)"})
        else:
            out.append({"target": f"imatrix effect on {level}", "met": None,
                        "numbers": f"{level} and {level}{IMAT} not both evaluated"})
    if "q4_0" in v:
        best = best_within(v, v["q4_0"]["size_mb"])
        out.append({"target": f"best variant no larger than q4_0: mean KLD ≤ {goal.q4_0_size_max_kld:g}",
                    "met": v[best]["kld_mean"] <= goal.q4_0_size_max_kld,
                    "numbers": f"{best}: {v[best]['kld_mean']:.4f} at {v[best]['size_mb']:.1f} MB"})
    if "q4_k_m" + IMAT in v:
        kld = v["q4_k_m" + IMAT]["kld_mean"]
        out.append({"target": f"q4_k_m{IMAT} mean KLD ≤ {goal.q4_k_m_imat_max_kld:g}",
                    "met": kld <= goal.q4_k_m_imat_max_kld, "numbers": f"{kld:.4f}"})
    if "searched" in v:
        s = v["searched"]
        rivals = {n: m for n, m in v.items() if n.endswith(IMAT) and n not in recipes and m["size_mb"] <= s["size_mb"]}
        if rivals:
            best = min(rivals, key=lambda n: rivals[n]["kld_mean"])
            cut = 1 - s["kld_mean"] / rivals[best]["kld_mean"]
            out.append({"target": f"searched recipe: mean KLD ≥ {goal.search_min_kld_cut:.0%} lower than every stock "
                                  "imatrix level no larger", "met": cut >= goal.search_min_kld_cut,
                        "numbers": f"searched {s['kld_mean']:.4f} at {s['size_mb']:.1f} MB vs {best} "
                                   f"{rivals[best]['kld_mean']:.4f} at {rivals[best]['size_mb']:.1f} MB "
                                   f"({-100 * cut:+.0f}%)"})
        else:
            out.append({"target": "searched recipe vs stock imatrix levels", "met": None,
                        "numbers": "no stock imatrix level as small as the searched recipe"})
    return out


def best_within(v: dict[str, dict], size_mb: float) -> str | None:
    """The quantized variant with the lowest mean KLD no larger than `size_mb` (None: none is that small)."""
    fits = {n: m for n, m in v.items() if n not in (BASE_VARIANT, REFERENCE_VARIANT) and m["size_mb"] <= size_mb}
    return min(fits, key=lambda n: fits[n]["kld_mean"], default=None)


def quantization_section(v: dict[str, dict], budgets: tuple[str, ...], calibration: dict, search: dict) -> str:
    """Plain vs imatrix per level, the recommendation per size budget, the calibration set and the search."""
    lines = [f"Importance matrix: {calibration.get('tokens', '?')} tokens ({calibration.get('chunks', '?')} "
             f"records) of `{calibration.get('calibration_source', '?')}` (sha256 "
             f"`{str(calibration.get('calibration_sha256', '?'))[:16]}…`), disjoint from the val split scored here.",
             "", "| level | size MB | KLD plain | KLD imatrix | change | top-1 % plain | top-1 % imatrix |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in v.items():
        if name.endswith(IMAT) and name.removesuffix(IMAT) in v:
            plain = v[name.removesuffix(IMAT)]
            lines.append(f"| {name.removesuffix(IMAT)} | {m['size_mb']:.1f} | {plain['kld_mean']:.4f} | "
                         f"{m['kld_mean']:.4f} | {100 * (m['kld_mean'] / plain['kld_mean'] - 1):+.0f}% | "
                         f"{100 * plain['top1_agreement']:.1f} | {100 * m['top1_agreement']:.1f} |")
    lines += ["", "Best variant (lowest mean KLD) within each size:", ""]
    for budget in budgets:
        if budget in v:
            best = best_within(v, v[budget]["size_mb"])
            lines.append(f"- ≤ {budget} ({v[budget]['size_mb']:.1f} MB): **{best}**, {v[best]['size_mb']:.1f} MB, "
                         f"KLD {v[best]['kld_mean']:.4f}, top-1 {100 * v[best]['top1_agreement']:.1f}%")
    if search:
        lines += ["", f"Search (stage `search`): {search['candidates']} candidates measured on "
                      f"{search['calibration_tokens']} train-split tokens in {search['seconds']:.0f} s, budget "
                      f"{search['budget_mib']:.1f} MiB; winner {search['winner_mib']:.1f} MiB, calibration KLD "
                      f"{search['winner_kld']:.4f} (predicted {search['winner_predicted_kld']:.4f}). Its recipe: "
                      "models/search/recipe.json; every candidate: reports/search/candidates.csv."]
    return "\n".join(lines)


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size and the quality loss (lower is better for both)."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_quality(rows: list[dict], path: Path, recipes: set[str] = frozenset()) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key, label in ((axes[0], "kld_mean", "mean KLD vs finetuned"), (axes[1], "ppl", "response PPL")):
        pts = [(r["size_mb"], r[key]) for r in rows if r["variant"] != BASE_VARIANT]
        for k, (marker, colour, legend) in KINDS.items():
            mine = [(r["size_mb"], r[key]) for r in rows
                    if r["variant"] != BASE_VARIANT and kind(r["variant"], recipes) == k]
            if mine:
                ax.scatter(*zip(*mine, strict=True), marker=marker, color=colour, label=legend,
                           s=90 if marker == "*" else 30)
        front = _pareto(pts)
        ax.plot(*zip(*front, strict=True), color="tab:orange", lw=1, label="Pareto front")
        for r in rows:
            if r["variant"] == BASE_VARIANT:
                ax.scatter([r["size_mb"]], [r[key]], color="tab:gray", marker="x", label="base")
            ax.annotate(r["variant"], (r["size_mb"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "kld_mean":
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("GGUF size (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Quality against size (lower-left is better)")
    fig.tight_layout()
    _save(fig, path)


def plot_speed(rows: list[dict], hf: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter([r["size_mb"] for r in rows], [r["gen_tps"] for r in rows], color="tab:green")
    for r in rows:
        ax.annotate(r["variant"], (r["size_mb"], r["gen_tps"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(hf["gen_tps"], color="tab:red", ls="--", lw=1, label=f"transformers fp32 ({hf['gen_tps']:.1f} tok/s)")
    ax.set_xlabel("GGUF size (MB)")
    ax.set_ylabel(f"generation tok/s ({hf['threads']} threads)")
    ax.set_title("Generation speed against size (llama-cpp-python)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def read_loss(loss_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Loss series from the finetune stage's plot data (CSV/TSV/JSON rows with `step` and `*loss*` columns)."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not loss_dir.is_dir():
        return series
    for path in sorted(loss_dir.iterdir()):
        rows = _rows_of(path)
        for row in rows:
            step = row.get("step")
            for key, value in row.items():
                if "loss" in key and step not in (None, "") and value not in (None, ""):
                    series.setdefault(f"{path.stem}: {key}", []).append((float(step), float(value)))
    return series


def _rows_of(path: Path) -> list[dict]:
    try:
        if path.suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"train": [...]} as DVC also accepts
                data = [r for v in data.values() if isinstance(v, list) for r in v]
            return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
    except (OSError, ValueError):
        log.warning("skipping unreadable loss data %s", path)
    return []


def plot_loss(series: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in series.items():
        ax.plot(*zip(*sorted(pts), strict=True), label=name, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def showcase(inputs: Inputs) -> str:
    def answers(v: str) -> dict[int, dict]:
        return {r["id"]: r for r in inputs.generations.get(v, []) if r["kind"] == "showcase"}

    ft = answers(REFERENCE_VARIANT)
    base = answers(BASE_VARIANT) if BASE_VARIANT in inputs.variants else {}
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
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    any_variant = next(iter(inputs.variants.values()))
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": any_variant["speed"]["threads"],
        "python": platform.python_version(), "platform": platform.platform(),
        **any_variant["llama_cpp"],
        **{p: _pkg(p) for p in ("torch", "transformers", "numpy", "rouge-score", "gguf", "dvc", "mlflow")},
    }


def render(inputs: Inputs, rows: list[dict], goals: list[dict], env: dict, figures: dict[str, str],
           loss_note: str, quantization: str = "") -> str:
    ref, hf = inputs.reference, inputs.reference["hf_fp32"]
    marks = {True: "**met**", False: "**missed**", None: "not measured"}
    any_v = next(iter(inputs.variants.values()))
    s = any_v["speed"]
    out = [
        "# Evaluation report", "",
        f"Run `{ref['run_id']}`: {ref['records']} held-out records, {ref['positions']} response tokens scored "
        f"(prompt masked); KLD, top-1 and Δp against finetuned (llama.cpp logits of the reference GGUF, top-"
        f"{ref['top_k']} + exact rest mass, see docs/stages.md); greedy answers to {ref['generate_prompts']} "
        f"validation and {ref['showcase_prompts']} fixed prompts, at most {any_v['max_new_tokens']} new tokens. "
        f"Speed: llama-cpp-python, {s['threads']} threads, median of {s['runs']} runs after a warm-up, "
        f"prompt {s['prompt_tokens']} tokens, generation {s['gen_tokens']} tokens.", "",
        "## Targets", "",
        *[f"- {marks[g['met']]}: {g['target']} — {g['numbers']}" for g in goals], "",
        "## Variants", "", markdown_table(rows), "",
        f"transformers fp32 `generate` on models/merged ({hf['threads']} threads): prompt "
        f"{hf['prompt_tps']:.0f} tok/s, generation {hf['gen_tps']:.1f} tok/s, load {hf['load_s']:.2f} s.", "",
        "Reading it: ΔPPL and KLD measure how far a variant's next-token distributions move from finetuned "
        "(0 for finetuned itself); top-1 % is how often it picks the same most likely token; RMS Δp is the "
        "typical change in the correct token's probability. base is a different model, so its KLD is what "
        "fine-tuning changed, not quantization error. EOS-stop, leak and repeats are shares of the greedy answers "
        "before any stop sequence cuts them: ended with EOS within the limit, wrote an Alpaca header (ran on into "
        "a new turn), repeated a 4-gram 3 or more times; answer tokens is their mean length. The answers shown "
        "below are cut at the stop sequences, as `make generate` prints them.", "",
        *(["## Quantization: importance matrix, i-quants, recipes", "", quantization, ""] if quantization else []),
        "## Plots", "",
        f"![quality against size]({figures['quality']})", "",
        f"![generation speed against size]({figures['speed']})", "",
        f"![training loss]({figures['loss']})" if "loss" in figures else loss_note, "",
        "## Base vs fine-tuned", "", showcase(inputs), "",
        "## Environment", "",
        *[f"- {k}: `{v}`" for k, v in env.items()], "",
    ]
    return "\n".join(out)


def write_table(rows: list[dict], path: Path) -> None:
    write_csv(path, [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
              [k for k, _, _ in COLUMNS])


def run(params: EvaluateParams, goal: ReportParams, evaluated: Path, reference: Path, generations: Path,
        loss_dir: Path, out: Path, figures_dir: Path, table: Path, recipes: set[str] = frozenset(),
        calibration: Path | None = None, search: Path | None = None, quantized: set[str] = frozenset()) -> dict:
    inputs = load_inputs(list(params.variants), evaluated, reference, generations)
    rows = table_rows(inputs)
    goals = targets(inputs, goal) + imatrix_targets(inputs.variants, goal, recipes)
    calib = read_details(calibration, "imatrix metrics") if calibration and calibration.is_file() else {}
    found = read_details(search, "search metrics") if search and search.is_file() else {}
    quantization = quantization_section(inputs.variants, goal.budget_variants, calib, found)
    env = environment(inputs)
    series = read_loss(loss_dir)
    rel = os.path.relpath(figures_dir, out.parent)
    figures = {"quality": f"{rel}/quality_vs_size.png", "speed": f"{rel}/speed_vs_size.png"}
    with atomic_path(figures_dir) as tmp:
        tmp.mkdir()
        plot_quality(rows, tmp / "quality_vs_size.png", recipes)
        plot_speed(rows, inputs.reference["hf_fp32"], tmp / "speed_vs_size.png")
        if series:
            plot_loss(series, tmp / "training_loss.png")
            figures["loss"] = f"{rel}/training_loss.png"
    note = f"*No training loss curve: no loss data found in {loss_dir}/ (the finetune stage writes it).*"
    write_text(out, render(inputs, rows, goals, env, figures, note, quantization))
    write_table(rows, table)
    return {"run_id": inputs.reference["run_id"], "variants": len(rows),
            "targets_met": sum(g["met"] is True for g in goals),
            "targets_missed": sum(g["met"] is False for g in goals),
            "targets": {g["target"]: g["met"] for g in goals},
            "recommended": recommend(inputs.variants, quantized, goal.recommend_max_mb)}


def recommend(v: dict[str, dict], quantized: set[str], max_mb: float) -> dict | None:
    """The quantized variant with the lowest mean KLD within `max_mb`, or None when none is that small."""
    best = best_within({n: m for n, m in v.items() if n in quantized}, max_mb)
    if best is None:
        log.warning("no quantized variant is within report.recommend_max_mb = %g MB: nothing recommended", max_mb)
        return None
    m = v[best]
    return {"variant": best, "max_mb": max_mb, "kld_mean": m["kld_mean"], "size_mb": m["size_mb"],
            "ppl": m.get("ppl"), "top1": m.get("top1_agreement"), "bits_per_weight": m.get("bits_per_weight"),
            "gen_tps": m.get("speed", {}).get("gen_tps")}


def attach_to_variant_runs(mlflow, run_id: str, files: list[Path]) -> int:
    """Log the report onto the newest evaluate run of each variant measured under `run_id`."""
    client = mlflow.MlflowClient()
    runs = client.search_runs([mlflow.active_run().info.experiment_id],
                              f"tags.dvc_stage = 'evaluate' and tags.eval_run_id = '{run_id}'",
                              order_by=["attributes.start_time DESC"])
    seen = set()
    for r in runs:
        variant = r.data.tags.get("variant")
        if variant in seen:
            continue
        seen.add(variant)
        for f in files:
            client.log_artifact(r.info.run_id, str(f))
    return len(seen)


# The DVC metric (report.json): the recommended model's numbers, under the evaluate metrics' names so that its
# row in `dvc metrics show` adds no columns. Targets (met / missed, by name) go to report.details.json.
METRICS = {k: f"recommended.{k}" for k in ("ppl", "kld_mean", "top1", "size_mb", "bits_per_weight", "gen_tps")}
# Per variant on the pipeline run, as `<variant>.<key>`: the evaluate metrics a comparison needs.
PIPELINE_KEYS = ("kld_mean", "ppl", "top1", "size_mb", "gen_tps")


def headline_metrics(variants: list[str], evaluated: Path, finetune: Path | None, record: dict) -> dict[str, float]:
    """What the pipeline run shows: eval loss, each variant's comparison metrics, the targets met."""
    out = {k: record[k] for k in ("targets_met", "targets_missed")}
    if finetune and finetune.is_file():
        out["eval_loss"] = read_json(finetune, "finetune metrics")["eval_loss"]
    for v in variants:
        flat = read_json(evaluated / f"{v}.json", f"variant {v}: metrics")
        out.update({f"{v}.{k}": flat[k] for k in PIPELINE_KEYS})
    return out


def publish(mlflow, headline: dict[str, float], files: list[Path], figures: Path, model: tuple[Path, Path] | None,
            recommended: dict | None) -> str | None:
    """Log the headline metrics and files onto the pipeline run; log and register the recommended model.
    Returns the registered version, if any."""
    import time

    from mlflow.entities import Metric

    from alpaca_lora_cpu.tracking import pipeline_run_id, register_model

    client, parent = mlflow.MlflowClient(), pipeline_run_id(mlflow)
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in headline.items()]
    for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        client.log_batch(parent, metrics=metrics[i:i + 1000])
    for f in files:
        if f.is_file():
            client.log_artifact(parent, str(f))
    client.log_artifacts(parent, str(figures), artifact_path="figures")
    if not (model and recommended):
        return None
    for f in model:
        client.log_artifact(parent, str(f), artifact_path="model")
    version = register_model(client, parent, "model", {
        "type": recommended["variant"], "kld_mean": f"{recommended['kld_mean']:.6g}",
        "size_mb": f"{recommended['size_mb']:.2f}", "gguf": model[0].name})
    return version


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "evaluated", "reference", "generations", "loss", "out", "figures", "table", "metrics")
    ap.add_argument("--imatrix-metrics", type=Path, help="the imatrix stage's metrics (calibration set)")
    ap.add_argument("--search-metrics", type=Path, help="the search stage's metrics")
    ap.add_argument("--finetune-metrics", type=Path, help="the finetune stage's metrics (eval loss)")
    ap.add_argument("--gguf-dir", type=Path, help="the variants' GGUF files and Modelfiles (the recommended one is "
                    "logged and registered)")
    args = parse_args(ap, argv)
    params = load_params(args.params)
    import matplotlib

    matplotlib.use("Agg")
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("report", {"evaluated": str(args.evaluated),
                              "report": {"recommend_max_mb": params.report.recommend_max_mb}}) as mlflow:
        recipes = {*params.quantize.recipes, "searched"}
        metrics = run(params.evaluate, params.report, args.evaluated, args.reference, args.generations, args.loss,
                      args.out, args.figures, args.table, recipes, args.imatrix_metrics, args.search_metrics,
                      set(params.quantize.types))
        # No recommendation (nothing within the budget): an empty row rather than a failed report.
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS, strict=False)
        mlflow.set_tags({"eval_run_id": metrics["run_id"]})
        mlflow.log_artifact(str(args.out))
        mlflow.log_artifacts(str(args.figures), artifact_path="figures")
        attached = attach_to_variant_runs(mlflow, metrics["run_id"], [args.out])
        rec = metrics["recommended"]
        model = None
        if rec and args.gguf_dir:
            stem = args.gguf_dir / params.evaluate.variants[rec["variant"]]
            model = (stem.with_suffix(".gguf"), stem.with_suffix(".Modelfile"))
        version = publish(mlflow, headline_metrics(list(params.evaluate.variants), args.evaluated,
                                                   args.finetune_metrics, metrics),
                          [args.out, Path(args.params), Path("dvc.lock")], args.figures, model, rec)
    log.info("wrote %s (%d variants; targets met %d, missed %d); report attached to %d variant runs", args.out,
             metrics["variants"], metrics["targets_met"], metrics["targets_missed"], attached)
    if version:
        log.info("recommended %s (mean KLD %.4f, %.1f MB) → MLflow model %s version %s", rec["variant"],
                 rec["kld_mean"], rec["size_mb"], REGISTERED_MODEL, version)


if __name__ == "__main__":
    run_cli(main)
