"""tracking: the flat DVC metric and its details file, and the pipeline run that spans its stages (in-process,
a temporary SQLite store; the end-to-end checks of the real pipeline's store are in test_pipeline.py)."""
from __future__ import annotations

import json

import pytest

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import details_path, read_details
from alpaca_lora_cpu.tracking import headline, stage_run, write_stage_metrics

RECORD = {"ppl": 6.4876150408, "variant": "q4_0", "speed": {"gen_tps": 178.80668933, "gen_tps_runs": [1.0, 2.0]},
          "gates_passed": True, "positions": 1299, "llama_cpp": {"system_info": "AVX2 = 1"}}


def test_headline_picks_dotted_paths_as_flat_rounded_numbers():
    flat = headline(RECORD, {"ppl": "ppl", "gen_tps": "speed.gen_tps", "gates_passed": "gates_passed",
                             "positions": "positions"})
    assert flat == {"ppl": 6.48762, "gen_tps": 178.807, "gates_passed": 1, "positions": 1299}
    assert headline(RECORD, ["ppl"]) == {"ppl": 6.48762}


@pytest.mark.parametrize("key", ["variant", "speed.gen_tps_runs", "speed.missing", "llama_cpp"])
def test_a_key_that_is_not_a_number_is_refused_or_left_out(key):
    with pytest.raises(StageError, match="not a number"):
        headline(RECORD, {"x": key})
    assert headline(RECORD, {"x": key, "ppl": "ppl"}, strict=False) == {"ppl": 6.48762}


def test_metrics_file_is_flat_and_the_details_file_has_the_whole_record(tmp_path):
    path = tmp_path / "evaluate/q4_0.json"
    flat = write_stage_metrics(None, path, RECORD, {"ppl": "ppl", "gen_tps": "speed.gen_tps"})
    assert json.loads(path.read_text()) == flat == {"ppl": 6.48762, "gen_tps": 178.807}
    assert details_path(path) == tmp_path / "evaluate/q4_0.details.json"
    assert read_details(path) == RECORD


def test_pipeline_run_spans_its_stages_and_carries_params(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PIPELINE_RUN_ID", "span-test")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("finetune:\n  lora:\n    r: 8\nevaluate:\n  threads: 2\n")
    for stage in ("prepare", "finetune"):
        with stage_run(stage, {}) as run_mlflow:
            run_mlflow.log_metric("x", 1.0)
    with pytest.raises(StageError), stage_run("merge", {}):
        raise StageError("gate failed")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'")
    children = client.search_runs([exp.experiment_id], "tags.kind = 'stage'")
    assert len(children) == 3 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children)
    assert parent.info.status == "FAILED"  # its last stage failed
    assert parent.data.params == {"finetune.lora.r": "8", "evaluate.threads": "2"}
    with stage_run("merge", {}):  # the rerun reopens the same pipeline run and ends it FINISHED
        pass
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
