"""make sweep: recipes × seeds become queued DVC experiments that really run, every adapter is scored on held-out
records no run trained or validated on, and the table compares recipes by paired tests."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import copy_repo, dvc, make_records, shrink_params, write_records

from alpaca_lora_cpu.errors import StageError
from tools.sweep import (
    Grid,
    choose,
    exp_name,
    heldout_records,
    latest_runs,
    markdown,
    queue_commands,
    read_grid,
    section,
    set_args,
    summarize,
)

HELDOUT = {"records": 4, "seed": 1, "ifeval_prompts": 2, "max_new_tokens": 4}


def grid(**runs) -> Grid:
    return Grid({"data.fraction": 1.0}, [1, 2], next(iter(runs)), HELDOUT, runs)


def test_overrides_become_dvc_set_params_in_yaml():
    assert set_args({"finetune.max_steps": None, "finetune.lora.target_modules": ["q_proj", "v_proj"],
                     "finetune.learning_rate": 1.0e-3, "finetune.lora.target_modules2": "all-linear"}) == [
        "-S", "finetune.max_steps=null", "-S", "finetune.lora.target_modules=[q_proj, v_proj]",
        "-S", "finetune.learning_rate=0.001", "-S", "finetune.lora.target_modules2=all-linear"]


def test_each_recipe_and_seed_is_a_named_queued_finetune_experiment(tmp_path):
    source = tmp_path / "alpaca.json"
    cmds = queue_commands(grid(r4={"finetune.lora.r": 4, "data.fraction": 0.5}), source)
    assert [c[6] for c in cmds] == ["sweep-r4-s1", "sweep-r4-s2"] and all(c[-1] == "finetune" for c in cmds)
    assert f"data.source={source.resolve()}" in cmds[0] and "data.fraction=0.5" in cmds[0]  # the run's value wins
    assert "data.fraction=1.0" not in cmds[0]
    assert "finetune.seed=1" in cmds[0] and "finetune.seed=2" in cmds[1]


@pytest.mark.parametrize("change,message", [
    ({"runs": None}, "needs exactly the keys"),
    ({"runs": {"a": 3}}, "runs.a must be a mapping"),
    ({"runs": {"a": {"finetune.seed": 3}}}, "may not set the seeds"),
    ({"seeds": [1, 1]}, "distinct integers"),
    ({"default": "zzz"}, "default 'zzz' is not one of the runs"),
    ({"heldout": {"records": 4}}, "heldout needs"),
])
def test_a_bad_grid_is_one_line(tmp_path, change, message):
    doc = {"common": {}, "seeds": [1, 2], "default": "a", "heldout": HELDOUT, "runs": {"a": {"x.y": 1}}, **change}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(StageError, match=message):
        read_grid(tmp_path / "g.yaml")


def test_sections_by_grid_name(tmp_path):
    assert section(tmp_path / "sweep.yaml") == "recipes" and section(tmp_path / "sweep-offline.yaml") == \
        "recipes-offline"


def _exp(name, state, ppl):
    data = {"params": {"params.yaml": {"data": {"finetune": {"seed": 1}}}},
            "metrics": {"reports/metrics/finetune.json": {"data": {"eval_loss": 1.0, "ppl": ppl}}}}
    return {"executor": {"state": state} if state else None, "name": name,
            "revs": [{"rev": name, "name": name, "data": data}]}


def test_only_finished_experiments_of_the_grid_count():
    show = [{"rev": "workspace", "data": {}, "experiments": None},
            {"rev": "c0ffee", "data": {}, "experiments": [
                _exp("sweep-a-s1", None, 8.0),      # finished earlier: no executor left
                _exp("sweep-a-s2", "success", 9.0),
                _exp("sweep-b-s1", "running", 1.0),  # still shows its baseline's metrics: not a result
                _exp("sweep-b-s2", "queued", 1.0),
                _exp("other", None, 1.0)]}]
    runs = latest_runs(show, grid(a={"x": 1}, b={"x": 2}), details=lambda rev: {"eval_perplexity": 5.0})
    assert sorted(runs) == ["sweep-a-s1", "sweep-a-s2"] and runs["sweep-a-s1"]["metrics"]["eval_perplexity"] == 5.0


def _scores(nll_scale: float, passes: list[bool], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    hard = np.random.default_rng(0).lognormal(0, 0.5, 60)  # shared record difficulty
    return {"nll": list(10 * hard * nll_scale * rng.uniform(0.98, 1.02, 60)), "tokens": [10] * 60,
            "ifeval": [[p] for p in passes]}


def test_paired_comparisons_and_the_choice():
    g = Grid({}, [1, 2, 3], "default", HELDOUT, {"default": {"x": 1}, "better": {"x": 2}, "worse_if": {"x": 3}})
    follow = [True] * 30 + [False] * 30
    base = _scores(1.0, follow, 9)
    scores = {exp_name("default", s): _scores(0.95, follow, s) for s in g.seeds}
    scores |= {exp_name("better", s): _scores(0.90, follow, 10 + s) for s in g.seeds}
    scores |= {exp_name("worse_if", s): _scores(0.80, [False] * 60, 20 + s) for s in g.seeds}
    runs = {n: {"metrics": {"eval_perplexity": 3.0, "train_seconds": 60.0}} for n in scores}
    rows = {r["recipe"]: r for r in summarize(g, runs, scores, base)}
    point, lo, hi = rows["better"]["ratio_default"]
    assert lo < point < hi < 1 and point == pytest.approx(0.90 / 0.95, rel=0.02)  # decided: better than default
    assert rows["default"]["ratio_default"][1:] == (pytest.approx(1.0), pytest.approx(1.0))
    assert rows["worse_if"]["if_base"][2] < 0  # follows no instruction: decidedly worse than the base
    assert rows["better"]["seeds"] == 3 and rows["better"]["ppl"][1] > 0  # mean ± sd over seeds
    assert choose(list(rows.values()))["recipe"] == "better"  # worse_if has the lowest PPL but fails IF
    text = markdown(list(rows.values()), g, base, "Data: x.", "today", None)
    assert "| better **(chosen)** |" in text and "÷ default" in text and "seeds [1, 2, 3]" in text


def test_an_unfinished_seed_leaves_its_recipe_out():
    g = Grid({}, [1, 2], "a", HELDOUT, {"a": {"x": 1}, "b": {"x": 2}})
    follow = [True, False]
    scores = {exp_name("a", 1): _scores(1, follow, 1), exp_name("a", 2): _scores(1, follow, 2),
              exp_name("b", 1): _scores(1, follow, 3)}
    runs = {n: {"metrics": {}} for n in scores}
    assert [r["recipe"] for r in summarize(g, runs, scores, _scores(1, follow, 4))] == ["a"]


def test_heldout_records_are_outside_every_runs_sample(tmp_path):
    from helpers import ROOT

    source = write_records(tmp_path / "alpaca.json", make_records(40))
    g = Grid({"data.fraction": 1.0, "data.max_samples": 10}, [1], "a", {**HELDOUT, "records": 15},
             {"a": {"x": 1}, "b": {"data.max_samples": 12}})
    held = heldout_records(g, source, source, ROOT / "params.yaml")
    again = heldout_records(g, source, source, ROOT / "params.yaml")
    assert held == again and len(held) == 15
    from alpaca_lora_cpu.records import clean, load_source
    from stages.prepare import sample_split
    from tools.sweep import data_params

    for recipe in ("a", "b"):
        p = data_params(g, recipe, source, ROOT / "params.yaml")
        assert p.max_samples == (10 if recipe == "a" else 12)
        train, val = sample_split(clean(load_source(str(source)), "drop")[0], p, take_all=False)
        keys = {json.dumps(r, sort_keys=True) for r in train + val}
        assert not keys & {json.dumps(r, sort_keys=True) for r in held}
    with pytest.raises(StageError, match="outside the sample"):
        heldout_records(Grid(g.common, [1], "a", {**HELDOUT, "records": 39}, g.runs), source, source,
                        ROOT / "params.yaml")


@pytest.mark.slow
def test_make_sweep_runs_seeded_experiments_and_scores_them_held_out(tmp_path, tiny_model_dir):
    repo = copy_repo(tmp_path / "repo")
    shrink_params(repo, ["q8_0"], {"base": {"model": str(tiny_model_dir)}})
    (repo / "sweep.yaml").write_text(yaml.safe_dump({
        "common": {"data.fraction": 1.0, "data.max_samples": 12, "finetune.max_steps": 2},
        "seeds": [1, 2], "default": "r2", "heldout": HELDOUT,
        "runs": {"r2": {"finetune.lora.r": 2}, "r4": {"finetune.lora.r": 4, "finetune.neftune_alpha": 5.0}}}))
    subprocess.run(["git", "commit", "-qam", "tiny"], cwd=repo, check=True)
    source = write_records(tmp_path / "alpaca.json", make_records(24))
    # A relative SQLite store, as the Makefile's default: the experiments must still log into this one.
    proc = subprocess.run([sys.executable, "-m", "tools.sweep", "--grid", "sweep.yaml", "--source", str(source),
                           "--doc", "docs/recipes.md"], cwd=repo, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (repo / "docs/recipes.md").read_text()
    assert "| r2" in table and "| r4 |" in table and (repo / "docs/recipes.png").read_bytes()[:4] == b"\x89PNG"
    assert "4 held-out records" in table and "seeds [1, 2]" in table
    cached = {p.name for p in (repo / "models/sweep").iterdir()}
    assert cached == {"recipes-base.json", *(f"{exp_name(r, s)}.json" for r in ("r2", "r4") for s in (1, 2))}
    s1, s2 = (json.loads((repo / f"models/sweep/{exp_name('r4', s)}.json").read_text()) for s in (1, 2))
    assert len(s1["nll"]) == 4 and len(s1["ifeval"]) == 2 and s1["nll"] != s2["nll"]  # the seeds differ
    with sqlite3.connect(repo / "mlflow.db") as db:
        tagged = {v for (v,) in db.execute("SELECT value FROM tags WHERE key = 'dvc_exp_name'")}
    assert {exp_name(r, s) for r in ("r2", "r4") for s in (1, 2)} <= tagged
    # --collect reuses the cached scores: the table again, no rescoring
    again = subprocess.run([sys.executable, "-m", "tools.sweep", "--grid", "sweep.yaml", "--source", str(source),
                            "--doc", "docs/recipes.md", "--collect"], cwd=repo, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "scoring" not in again.stderr, again.stderr[-2000:]
    assert dvc(repo, "exp", "show", "--json").returncode == 0


def test_a_heldout_record_whose_prompt_fills_the_cutoff_weighs_nothing(tiny_model_dir):
    from alpaca_lora_cpu.heldout import load, record_nll

    model, tokenizer = load(tiny_model_dir, None, 2)
    records = make_records(3)
    records[1]["instruction"] = "word " * 400  # the prompt alone is longer than cutoff_len
    nll, tokens = record_nll(model, tokenizer, records, "alpaca", 64)
    assert tokens[1] == 0 and nll[1] == 0.0 and tokens[0] > 0 and tokens[2] > 0 and nll[0] > 0
