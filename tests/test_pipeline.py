"""End to end: `dvc repro` of the pipeline on the real embedded model, in a temp copy of the repo."""
from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow


def dvc(repo, *args, check=True):
    proc = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, timeout=3600,
                          env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"})
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def shrink_finetune(repo) -> None:
    """One optimizer step of 4 samples: the pipeline runs through finetune on the real model, quickly."""
    import yaml

    path = repo / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["finetune"].update(batch_size=4, micro_batch_size=4, max_steps=1, warmup_steps=0, eval_steps=1,
                           save_steps=1)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_repro_on_embedded_model_then_noop(repo_copy):
    shrink_finetune(repo_copy)
    dvc(repo_copy, "repro")
    base = json.loads((repo_copy / "reports/metrics/base.json").read_text())
    assert base["architecture"] == "llama" and base["source_kind"] == "builtin"
    assert 130e6 < base["parameters"] < 140e6 and base["vocab_size"] == 49152
    prep = json.loads((repo_copy / "reports/metrics/prepare.json").read_text())
    assert prep["offline_fallback"] is True and prep["train_records"] + prep["val_records"] >= 150
    assert (repo_copy / "models/base/model.safetensors").is_file()
    tuned = json.loads((repo_copy / "reports/metrics/finetune.json").read_text())
    assert tuned["steps"] == 1 and tuned["eval_loss"] > 0 and tuned["adapter_max_abs_lora_b"] > 0
    assert (repo_copy / "models/adapter/adapter_model.safetensors").is_file()

    second = dvc(repo_copy, "repro")
    assert "Running stage" not in second.stdout, second.stdout

    # A data.* change reruns prepare (and what depends on it), not base.
    params = repo_copy / "params.yaml"
    params.write_text(params.read_text().replace("seed: 42", "seed: 7", 1))
    third = dvc(repo_copy, "repro")
    assert "Running stage 'prepare'" in third.stdout and "Running stage 'base'" not in third.stdout


def test_mlflow_records_stage_runs_grouped(repo_copy):
    dvc(repo_copy, "repro", "prepare")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo_copy}/mlflow.db")
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    runs = client.search_runs([exp.experiment_id])
    stages = [r for r in runs if r.data.tags.get("kind") == "stage"]
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert {r.data.tags["dvc_stage"] for r in stages} >= {"prepare"}
    assert len(parents) == 1
    prep = next(r for r in stages if r.data.tags["dvc_stage"] == "prepare")
    assert prep.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert prep.data.params["data.fraction"] == "0.01"
    assert prep.data.tags["source_used"] == "data/sample/alpaca_sample.json"
    assert len(prep.data.tags["git_commit"]) >= 40


def test_dvc_experiment_shows_in_dvc_and_mlflow(repo_copy):
    dvc(repo_copy, "exp", "run", "prepare", "-S", "data.seed=7", "--name", "seed7")
    shown = dvc(repo_copy, "exp", "show", "--json").stdout
    assert "seed7" in shown and '"seed": 7' in shown.replace("\n", " ").replace("  ", " ")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo_copy}/mlflow.db")
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    runs = client.search_runs([exp.experiment_id], "tags.dvc_exp_name = 'seed7' and tags.kind = 'stage'")
    assert len(runs) == 1
    tags = runs[0].data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_copy, capture_output=True, text=True).stdout
    assert tags["git_commit"].startswith(head.strip()) and tags["dvc_lock"]
    assert runs[0].data.params["data.seed"] == "7"
