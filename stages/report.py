"""report: reports/report.md with PNG plots beside it, from the evaluate records of every variant.

Run: python -m stages.report --params params.yaml --evaluated reports/metrics/evaluate \
         --reference reports/metrics/reference.json --generations reports/evaluate --loss reports/plots/finetune \
         --out reports/report.md --figures reports/figures --table reports/plots/evaluate.csv \
         --metrics reports/metrics/report.json --imatrix-metrics reports/metrics/imatrix.json \
         --search-metrics reports/metrics/search.json --finetune-metrics reports/metrics/finetune.json \
         --quantize-metrics reports/metrics/quantize --gguf-dir models/gguf

The table (a row per variant: base, finetuned, each quantize.types entry; a column per metric_table row), the
quality/size and speed/size plots, the training loss curve, base vs fine-tuned answers to the fixed prompts, the
environment, the instruction-following table, and each target of the project stated as met, missed or undecided on
its 95% interval (paired bootstrap for every comparison; alpaca_lora_cpu/report/). Refuses records from different
pipeline runs (their `run_id`s differ from the reference's) and names any variant without them. Onto the pipeline's
MLflow run it logs the headline metrics, the report and the recommended model (lowest mean KLD within
report.recommend_max_mb), registered as a new version of the MLflow model `alpaca-lora-cpu-gguf`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import IntervalParams, QuantizeParams, ReportParams, load_params
from alpaca_lora_cpu.files import atomic_path, write_csv, write_text
from alpaca_lora_cpu.metric_table import flat_paths, row
from alpaca_lora_cpu.report import inputs, markdown, plots
from alpaca_lora_cpu.report.targets import Evidence, all_targets, counts, difference, ratio_of, recommend
from alpaca_lora_cpu.variants import BASE, FINETUNED, gguf_stem, names, parse

log = logging.getLogger("report")


@dataclass(frozen=True)
class Outputs:
    report: Path   # reports/report.md
    figures: Path  # reports/figures/
    table: Path    # reports/plots/evaluate.csv (dvc plots draws it)


def table_rows(found: inputs.Inputs, quantize: QuantizeParams, e: Evidence) -> list[dict]:
    """A row per variant: its metric_table numbers and their intervals (`ci`); ΔPPL's is paired with finetuned."""
    ref = found.variants[FINETUNED]
    out = []
    for v, m in found.variants.items():
        ci = {**m["ci"], "delta_ppl": list(e.pair(v, FINETUNED, "ppl", difference)[1:])}
        out.append({"variant": v, "kind": parse(v, quantize.recipes).kind, **row(m, ref), "ci": ci})
    return out


def paired_following(e: Evidence) -> dict[str, tuple]:
    """Prompt-level strict IF accuracy, paired: fine-tuned − base, every other variant − finetuned."""
    out = {}
    for v, stats in e.stats.items():
        against = BASE if v == FINETUNED else FINETUNED
        if v != BASE and "if_prompt_strict" in stats and "if_prompt_strict" in e.stats.get(against, {}):
            out[v] = (*e.pair(v, against, "if_prompt_strict", difference), against)
    return out


def csv_rows(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The table behind `dvc plots`: every number, and each interval as <name>_lo / <name>_hi."""
    flat = []
    for r in rows:
        out = {k: round(x, 6) if isinstance(x, float) else x for k, x in r.items() if k not in ("kind", "ci")}
        for k, (lo, hi) in sorted(r["ci"].items()):
            out[f"{k}_lo"], out[f"{k}_hi"] = round(lo, 6), round(hi, 6)
        flat.append(out)
    fields = list(dict.fromkeys(k for r in flat for k in r))
    return flat, fields


def draw(rows: list[dict], found: inputs.Inputs, folder: Path, report: Path) -> dict[str, str]:
    """The figures, written as one folder; their paths relative to the report."""
    rel = os.path.relpath(folder, report.parent)
    figures = {"quality": f"{rel}/quality_vs_size.png", "speed": f"{rel}/speed_vs_size.png"}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        plots.quality(rows, tmp / "quality_vs_size.png")
        plots.speed(rows, found.reference["hf_fp32"], tmp / "speed_vs_size.png")
        if found.loss:
            plots.loss(found.loss, tmp / "training_loss.png")
            figures["loss"] = f"{rel}/training_loss.png"
    return figures


def run(goal: ReportParams, quantize: QuantizeParams, iv: IntervalParams, src: inputs.Sources, out: Outputs,
        found: inputs.Inputs | None = None) -> dict:
    found = found or inputs.load(names(quantize.types), src)
    e = Evidence.of(found.variants, found.generations, iv, found.reference["hf_fp32"],
                    found.reference.get("val_source", "the validation split"))
    rows = table_rows(found, quantize, e)
    goals = all_targets(e, goal, quantize.recipes)
    changes = {name: e.pair(name, plain, "kld_mean", ratio_of) for name, plain in
               markdown.against_plain(found.variants).items()}
    section = markdown.quantization_section(found.variants, goal.budget_variants, found.calibration, found.search,
                                            changes, found.quantize_seconds)
    following = markdown.instruction_following(rows, paired_following(e), found.reference)
    figures = draw(rows, found, out.figures, out.report)
    note = f"*No training loss curve: no loss data found in {src.loss}/ (the finetune stage writes it).*"
    write_text(out.report, markdown.render(found, rows, goals, figures, note, section, following))
    write_csv(out.table, *csv_rows(rows))
    recommended = recommend(found.variants, set(quantize.types), goal.recommend_max_mb)
    if recommended is None:
        log.warning("no quantized variant is within report.recommend_max_mb = %g MB: nothing recommended",
                    goal.recommend_max_mb)
    return {"run_id": found.reference["run_id"], "variants": len(rows), **counts(goals),
            "targets": {g["target"]: {"status": g["status"], "numbers": g["numbers"]} for g in goals},
            "recommended": recommended}


# The DVC metric (report.json): the recommended model's flat numbers, under the evaluate metrics' names so that its
# row in `dvc metrics show` adds no columns. Targets (met / missed, by name) go to report.details.json.
def metric_keys() -> dict[str, str]:
    return {k: f"recommended.{k}" for k in flat_paths()}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "evaluated", "reference", "generations", "loss", "out", "figures", "table", "metrics")
    ap.add_argument("--imatrix-metrics", type=Path, help="the imatrix stage's metrics (calibration set)")
    ap.add_argument("--search-metrics", type=Path, help="the search stage's metrics")
    ap.add_argument("--finetune-metrics", type=Path, help="the finetune stage's metrics (eval loss)")
    ap.add_argument("--quantize-metrics", type=Path, help="the quantize stages' metrics folder (quantize times)")
    ap.add_argument("--gguf-dir", type=Path, help="the variants' GGUF files and Modelfiles (the recommended one is "
                    "logged and registered)")
    args = parse_args(ap, argv)
    params = load_params(args.params)
    src = inputs.Sources(args.evaluated, args.reference, args.generations, args.loss, args.imatrix_metrics,
                         args.search_metrics, args.finetune_metrics, args.quantize_metrics)
    found = inputs.load(names(params.quantize.types), src)  # missing or mixed inputs stop here, before tracking
    import matplotlib

    matplotlib.use("Agg")
    from alpaca_lora_cpu.report.publish import REGISTERED_MODEL, attach_to_variant_runs, headline_metrics, publish
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("report", {"evaluated": str(args.evaluated),
                              "report": {"recommend_max_mb": params.report.recommend_max_mb}}) as mlflow:
        outputs = Outputs(args.out, args.figures, args.table)
        metrics = run(params.report, params.quantize, params.intervals, src, outputs, found)
        # No recommendation (nothing within the budget): an empty row rather than a failed report.
        write_stage_metrics(mlflow, args.metrics, metrics, metric_keys(), strict=False)
        mlflow.set_tags({"eval_run_id": metrics["run_id"]})
        mlflow.log_artifact(str(args.out))
        mlflow.log_artifacts(str(args.figures), artifact_path="figures")
        attached = attach_to_variant_runs(mlflow, metrics["run_id"], [args.out])
        rec = metrics["recommended"]
        model = None
        if rec and args.gguf_dir:
            stem = args.gguf_dir / gguf_stem(rec["variant"])
            model = (stem.with_suffix(".gguf"), stem.with_suffix(".Modelfile"))
        version = publish(mlflow, headline_metrics(found, metrics), [args.out, Path(args.params), Path("dvc.lock")],
                          args.figures, model, rec)
    log.info("wrote %s (%d variants; targets met %d, missed %d, undecided %d); report attached to %d variant runs",
             args.out, metrics["variants"], metrics["targets_met"], metrics["targets_missed"],
             metrics["targets_undecided"], attached)
    if version:
        log.info("recommended %s (mean KLD %.4f, %.1f MB) → MLflow model %s version %s", rec["variant"],
                 rec["kld_mean"], rec["size_mb"], REGISTERED_MODEL, version)


if __name__ == "__main__":
    run_cli(main)
