"""The per-variant metrics, one row each: where the number lives in the evaluate record, its one name (flat DVC
metric, MLflow metric, CSV column), the report's column header and format, and where else it is published.

A new metric is one row here plus the code that computes it (stages/evaluate.py or alpaca_lora_cpu/metrics.py).
`flat` rows are every evaluate stage's DVC metric (one `dvc metrics show` table, so keep them few: each adds a
column, and tests/test_metric_table.py holds the table to a terminal's width), the evaluate runs' MLflow metrics
and the recommended model's numbers in reports/metrics/report.json; `headline` rows also go onto the pipeline's
MLflow run as `<variant>.<name>`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from alpaca_lora_cpu.tracking import lookup


@dataclass(frozen=True)
class Metric:
    name: str                 # the one name: evaluate record key, flat metric, CSV column
    header: str               # the report table's column header
    fmt: str                  # how the report prints value × scale
    path: str | None = None   # dotted path in the evaluate record, when not `name`
    scale: float = 1.0        # the report prints value × scale (100: a share as %)
    flat: bool = False        # a DVC metric of every evaluate stage, an MLflow metric, in report.json
    headline: bool = False    # on the pipeline's MLflow run as <variant>.<name>
    derive: Callable[[Mapping, Mapping], float] | None = None  # computed from (record, the reference's record)


METRICS: tuple[Metric, ...] = (
    Metric("size_mb", "size MB", "{:.1f}", flat=True, headline=True),
    Metric("bits_per_weight", "bits/w", "{:.2f}", flat=True),
    Metric("ppl", "PPL", "{:.3f}", flat=True, headline=True),
    Metric("delta_ppl", "ΔPPL vs finetuned", "{:+.3f}", derive=lambda m, ref: m["ppl"] - ref["ppl"]),
    Metric("kld_mean", "KLD mean", "{:.4g}", flat=True, headline=True),
    Metric("kld_p99", "KLD p99", "{:.4g}"),
    Metric("top1", "top-1 %", "{:.2f}", scale=100, flat=True, headline=True),
    Metric("rms_dp", "RMS Δp %", "{:.2f}", scale=100),
    Metric("rouge_l", "ROUGE-L", "{:.3f}"),
    Metric("stop_rate", "EOS-stop %", "{:.0f}", scale=100, flat=True),
    Metric("leak_rate", "leak %", "{:.0f}", scale=100, flat=True),
    Metric("loop_rate", "repeats %", "{:.0f}", scale=100, flat=True),
    Metric("answer_tokens", "answer tokens", "{:.0f}"),
    Metric("if_prompt_strict", "IF prompt %", "{:.0f}", scale=100),
    Metric("if_inst_strict", "IF instr. %", "{:.0f}", scale=100),
    Metric("prompt_tps", "prompt tok/s", "{:.0f}", path="speed.prompt_tps"),
    Metric("gen_tps", "gen tok/s", "{:.1f}", path="speed.gen_tps", flat=True, headline=True),
    Metric("load_s", "load s", "{:.2f}", path="speed.load_s"),
    Metric("peak_rss_mb", "peak RSS MB", "{:.0f}", path="speed.peak_rss_mb"),
)
BY_NAME = {m.name: m for m in METRICS}


def value(metric: Metric, record: Mapping, reference: Mapping | None = None) -> float | None:
    if metric.derive is not None:
        return metric.derive(record, reference or record)
    return lookup(record, metric.path or metric.name)


def flat_paths() -> dict[str, str]:
    """flat name → path in the evaluate record: the keys `tracking.write_stage_metrics` publishes."""
    return {m.name: m.path or m.name for m in METRICS if m.flat and m.derive is None}


def headline_names() -> list[str]:
    return [m.name for m in METRICS if m.headline]


def row(record: Mapping, reference: Mapping) -> dict[str, float | None]:
    """Every metric of one variant (name → value), the reference's record at hand for derived ones."""
    return {m.name: value(m, record, reference) for m in METRICS}


def formatted(metric: Metric, number: float | None, interval: list[float] | None = None) -> str:
    """The number as the report prints it, with its interval (`[lo, hi]`, same format) when it has one."""
    if number is None or number != number:
        return "–"
    text = metric.fmt.format(number * metric.scale)
    if interval is None or any(x is None or x != x for x in interval):
        return text
    lo, hi = (metric.fmt.format(x * metric.scale) for x in interval)
    return f"{text} [{lo}, {hi}]"
