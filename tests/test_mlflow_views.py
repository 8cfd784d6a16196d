"""tools.mlflow_views: the links open on the newest pipeline's evaluate runs, flat (a filter and a non-time
order), on the Model-training side; the screenshot state adds the scatter and parallel-coordinates charts."""
from __future__ import annotations

import urllib.parse

from tools.mlflow_views import _with_charts, views


def test_links_point_at_the_newest_pipelines_variants(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("alpaca-lora-cpu")
    for pipeline in ("old", "new"):  # created in this order: "new" is the newest
        run = client.create_run(exp, tags={"dvc_stage": "evaluate", "pipeline_run": pipeline})
        client.set_terminated(run.info.run_id)
    links = views(uri)
    query = dict(urllib.parse.parse_qsl(links["charts"].split("?", 1)[1]))
    assert links["charts"].startswith(f"#/experiments/{exp}/runs?")
    assert query["searchFilter"] == "tags.dvc_stage = 'evaluate' and tags.pipeline_run = 'new'"
    assert query["workflowType"] == "machine_learning" and query["compareRunsMode"] == "CHART"
    # Sorted by anything but the start time, the UI lists child runs flat instead of under their parent.
    assert query["orderByKey"] == "metrics.`size_mb`"
    assert links["registry"] == "#/models/alpaca-lora-cpu-gguf"


def test_screenshot_state_adds_scatter_and_parallel_charts_once():
    state = {"compareRunCharts": [{"uuid": "auto", "type": "BAR", "metricSectionId": "s1", "metricKey": "ppl"}],
             "runsHiddenMode": "FIRST_10_RUNS"}
    once = _with_charts(state)
    twice = _with_charts(once)
    assert [c["type"] for c in twice["compareRunCharts"]] == ["SCATTER", "PARALLEL", "BAR"]
    assert {c["metricSectionId"] for c in twice["compareRunCharts"]} == {"s1"}
    assert twice["runsHiddenMode"] == "SHOW_ALL" and "metrics.`kld_mean`" in twice["selectedColumns"]
