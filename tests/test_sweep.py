"""make sweep: the grid becomes queued DVC experiments that really run, and the table reads only finished ones."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import yaml
from helpers import copy_repo, dvc, make_records, shrink_params, write_records

from alpaca_lora_cpu.errors import StageError
from tools.sweep import git_details, markdown, queue_commands, read_grid, rows_from_show, set_args


def test_overrides_become_dvc_set_params_in_yaml():
    assert set_args({"finetune.max_steps": None, "finetune.lora.target_modules": ["q_proj", "v_proj"],
                     "finetune.learning_rate": 1.0e-3, "finetune.lora.target_modules2": "all-linear"}) == [
        "-S", "finetune.max_steps=null", "-S", "finetune.lora.target_modules=[q_proj, v_proj]",
        "-S", "finetune.learning_rate=0.001", "-S", "finetune.lora.target_modules2=all-linear"]


def test_each_run_is_a_named_queued_finetune_experiment_on_the_absolute_source(tmp_path):
    source = tmp_path / "alpaca.json"
    (cmd,) = queue_commands({"data.fraction": 1.0}, {"r4": {"finetune.lora.r": 4, "data.fraction": 0.5}}, source)
    assert cmd[:7] == ["dvc", "exp", "run", "--queue", "--force", "-n", "sweep-r4"] and cmd[-1] == "finetune"
    assert f"data.source={source.resolve()}" in cmd and "data.fraction=0.5" in cmd  # the run's value wins
    assert "data.fraction=1.0" not in cmd


@pytest.mark.parametrize("text,message", [("common: {}\n", "exactly the keys"),
                                          ("common: {}\nruns: {a: 3}\n", "runs.a must be a mapping")])
def test_a_bad_grid_is_one_line(tmp_path, text, message):
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(StageError, match=message):
        read_grid(tmp_path / "g.yaml")


def _exp(name, state, ppl, base=10.0):
    # The DVC metric holds a few numbers; the rest comes from the details file in the experiment's commit.
    metrics = {"eval_loss": 1.0, "ppl": ppl}
    DETAILS[name] = {"eval_perplexity": ppl, "base_eval_perplexity": base, "eval_ppl_ratio": ppl / base,
                     "eval_loss": 1.0, "train_seconds": 120.0, "train_tokens_per_second": 400.0, "precision_bf16": 0}
    params = {"finetune": {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "epochs": 1,
                           "learning_rate": 3e-4}}
    data = {"params": {"params.yaml": {"data": params}},
            "metrics": {"reports/metrics/finetune.json": {"data": metrics}}}
    return {"executor": {"state": state} if state else None, "name": name,
            "revs": [{"rev": name, "name": name, "data": data}]}


DETAILS: dict[str, dict] = {}


def test_table_reads_only_finished_experiments_in_grid_order():
    show = [{"rev": "workspace", "data": {}, "experiments": None},
            {"rev": "c0ffee", "data": {}, "experiments": [
                _exp("sweep-b", None, 8.0),          # finished earlier: no executor left
                _exp("sweep-a", "success", 9.0),
                _exp("sweep-c", "running", 1.0),     # still shows its baseline's metrics: not a result
                _exp("sweep-d", "queued", 1.0),
                _exp("other", None, 1.0)]}]
    rows = rows_from_show(show, ["a", "b", "c", "d"], details=DETAILS.get)
    assert [r["recipe"] for r in rows] == ["a", "b"]
    assert rows[1]["ratio"] == pytest.approx(0.8) and rows[0]["train min"] == pytest.approx(2.0)
    assert rows[0]["target_modules"] == "q_proj,v_proj" and rows[0]["precision"] == "fp32"
    table = markdown(rows, "x.json", "today", None)
    assert "| b **(best)** | 8 |" in table and table.count("\n| a ") == 1


@pytest.mark.slow
def test_make_sweep_runs_queued_experiments_into_dvc_mlflow_and_the_table(tmp_path, tiny_model_dir):
    repo = copy_repo(tmp_path / "repo")
    shrink_params(repo, ["q8_0"], {"base": {"model": str(tiny_model_dir)}})
    (repo / "sweep.yaml").write_text(yaml.safe_dump({
        "common": {"data.fraction": 1.0, "data.max_samples": 12, "finetune.max_steps": 2},
        "runs": {"r2": {"finetune.lora.r": 2}, "r4": {"finetune.lora.r": 4}}}))
    subprocess.run(["git", "commit", "-qam", "tiny"], cwd=repo, check=True)
    source = write_records(tmp_path / "alpaca.json", make_records(20))
    # A relative SQLite store, as the Makefile's default: the experiments must still log into this one.
    proc = subprocess.run([sys.executable, "-m", "tools.sweep", "--grid", "sweep.yaml", "--source", str(source),
                           "--doc", "docs/recipes.md"], cwd=repo, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (repo / "docs/recipes.md").read_text()
    assert "| r2 " in table and "| r4 " in table and (repo / "docs/recipes.png").read_bytes()[:4] == b"\x89PNG"
    show = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    rows = rows_from_show(show, ["r2", "r4"], details=lambda rev: git_details(rev, repo))
    assert [r["lora.r"] for r in rows] == [2, 4] and all(r["val PPL"] > 1 for r in rows)
    with sqlite3.connect(repo / "mlflow.db") as db:
        tagged = {v for (v,) in db.execute("SELECT value FROM tags WHERE key = 'dvc_exp_name'")}
    assert {"sweep-r2", "sweep-r4"} <= tagged
