"""The per-variant metric table: one name per number, and a `dvc metrics show` that still fits a terminal."""
from __future__ import annotations

import yaml
from helpers import ROOT

from alpaca_lora_cpu.metric_table import BY_NAME, METRICS, flat_paths, formatted, headline_names, row
from alpaca_lora_cpu.variants import names

TERMINAL = 180  # columns: a maximized window; tests/test_pipeline.py measures the real table against the same
VALUE_WIDTH = 7  # tracking.headline keeps 6 significant digits: "0.00367", "270.886"


def test_one_name_per_number():
    assert len(BY_NAME) == len(METRICS)
    assert set(headline_names()) <= set(flat_paths())  # the pipeline run's headline is also the DVC metric


def test_rows_read_nested_paths_derive_and_format():
    ref = {"ppl": 6.0, "speed": {"gen_tps": 100.0}}
    record = {"ppl": 6.5, "top1": 0.87654, "speed": {"gen_tps": 120.0}}
    r = row(record, ref)
    assert r["gen_tps"] == 120.0 and r["delta_ppl"] == 0.5 and r["kld_mean"] is None
    assert formatted(BY_NAME["top1"], r["top1"]) == "87.65" and formatted(BY_NAME["kld_mean"], None) == "–"


def test_dvc_metrics_show_fits_a_terminal():
    """What tests/test_pipeline.py checks on a real table, estimated here from the table's names, so a metric
    too many fails in make test-fast rather than in the slow tier: the path column, then each flat metric's
    column (the wider of its name and its values) and the gaps between."""
    types = yaml.safe_load((ROOT / "params.yaml").read_text())["quantize"]["types"]
    longest_path = max(len(f"reports/metrics/evaluate/{v}.json") for v in names(types))
    columns = [*flat_paths(), "eval_loss"]  # finetune's DVC metric adds its own column (its ppl shares evaluate's)
    width = longest_path + 4 + sum(max(len(c), VALUE_WIDTH) + 4 for c in dict.fromkeys(columns))
    assert width <= TERMINAL, f"`dvc metrics show` would be about {width} columns wide: drop a `flat` metric"
