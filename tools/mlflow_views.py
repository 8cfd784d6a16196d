"""Links into the MLflow UI that open on the comparison of the quantized variants, and headless-Chromium
screenshots of those views for docs/.

Run: python -m tools.mlflow_views --uri sqlite:///mlflow.db --base http://127.0.0.1:5000  (`make mlflow-ui`)
     python -m tools.mlflow_views --uri sqlite:///mlflow.db --screenshots docs --port 5000  (`make screenshots`)

What the links set, checked against MLflow 3.17's UI in headless Chromium:
- `workflowType=machine_learning`: the "Model training" side of the UI. The experiment's `mlflow.experimentKind`
  tag alone did not switch a fresh browser profile away from the GenAI overview.
- a filter on the newest pipeline's evaluate runs, ordered by size: with a filter and an order other than the
  start time, the UI lists child runs flat instead of folding them under their pipeline run, so the charts
  compare the variants with no runs picked by hand.
- `compareRunsMode=CHART` for the chart view (one chart per evaluate metric).

Screenshots: Playwright drives Debian's `chromium` (no browser download). The UI keeps chart layout and
visible columns in the browser's localStorage, not in the URL; for the shots the script writes there what
*Add chart → Scatter* (size_mb vs kld_mean), *Add chart → Parallel coordinates*, *Show all runs* and the column
picker would, and closes the assistant panel.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from alpaca_lora_cpu.report.publish import REGISTERED_MODEL
from alpaca_lora_cpu.tracking import EXPERIMENT

WINDOW = "2200,1000"


def newest_pipeline(client, experiment_id: str) -> str | None:
    """The pipeline_run tag of the newest evaluate run (the variants of the last pipeline that evaluated)."""
    runs = client.search_runs([experiment_id], "tags.dvc_stage = 'evaluate'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].data.tags.get("pipeline_run") if runs else None


def views(uri: str) -> dict[str, str]:
    """name → URL fragment (after the server root) of each view."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"error: no MLflow experiment {name!r} in {uri}: run `make repro` first")
    pipeline = newest_pipeline(client, experiment.experiment_id)
    search = "tags.dvc_stage = 'evaluate'" + (f" and tags.pipeline_run = '{pipeline}'" if pipeline else "")
    variants = {"workflowType": "machine_learning", "searchFilter": search,
                "orderByKey": "metrics.`size_mb`", "orderByAsc": "true"}

    def url(query: dict[str, str]) -> str:
        return (f"#/experiments/{experiment.experiment_id}/runs?"
                + urllib.parse.urlencode(query, quote_via=urllib.parse.quote))

    return {"runs": url({**variants, "compareRunsMode": "TABLE"}),
            "charts": url({**variants, "compareRunsMode": "CHART"}),
            "pipelines": url({"workflowType": "machine_learning", "searchFilter": "tags.kind = 'pipeline'"}),
            "registry": f"#/models/{REGISTERED_MODEL}"}


def _wait_for(base: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: mlflow ui exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"error: mlflow ui did not answer on {base} within {seconds:.0f} s")


# What *Add chart → Scatter* (X size_mb, Y kld_mean) and *Add chart → Parallel coordinates* produce, and the
# eye menu's *Show all runs*: the screenshots write them into the UI's saved state instead of clicking.
CHARTS = [
    {"uuid": "kld-vs-size", "type": "SCATTER", "xaxis": {"key": "size_mb", "type": "METRIC"},
     "yaxis": {"key": "kld_mean", "type": "METRIC"}, "runsCountToCompare": 100},
    {"uuid": "variants-parallel", "type": "PARALLEL", "selectedParams": ["variant", "imatrix", "recipe"],
     "selectedMetrics": ["size_mb", "bits_per_weight", "kld_mean", "ppl", "gen_tps"], "showAllRuns": True},
]
SHOWN = ("size_mb", "bits_per_weight", "kld_mean", "ppl", "top1", "gen_tps")
COLUMNS = ["params.`imatrix`", "params.`recipe`", *(f"metrics.`{k}`" for k in SHOWN)]
PIPELINE_COLUMNS = [*(f"metrics.`{k}`" for k in ("eval_loss", "targets_met", "targets_missed", "searched.kld_mean",
                                                  "q4_k_m-imat.kld_mean", "q4_0.kld_mean", "q8_0.kld_mean")),
                    *(f"params.`{k}`" for k in ("finetune.lora.r", "finetune.learning_rate", "finetune.epochs"))]


def _with_charts(state: dict) -> dict:
    charts = state.get("compareRunCharts") or []
    section = charts[0]["metricSectionId"] if charts else None
    added = [{**c, "metricSectionId": section, "deleted": False, "isGenerated": False} for c in CHARTS]
    return {**state, "compareRunCharts": added + [c for c in charts if c["uuid"] not in {a["uuid"] for a in added}],
            "runsHiddenMode": "SHOW_ALL", "selectedColumns": COLUMNS}


def _shoot(browser: str, targets: dict[str, str], base: str, out_dir: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    shots = []
    width, height = (int(x) for x in WINDOW.split(","))
    with sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = chrome.new_page(viewport={"width": width, "height": height})
        for name, fragment in targets.items():
            page.goto(f"{base}/{fragment}")
            page.wait_for_timeout(6000)  # the UI saves its state for this experiment once it has loaded
            # The assistant panel would take a quarter of the width: closed, as after a click on its X.
            page.evaluate("() => localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
            key = page.evaluate("() => Object.keys(localStorage).find(k => k.includes('-ExperimentPage-'))")
            if name in ("runs", "charts", "pipelines") and key:
                state = json.loads(page.evaluate("(k) => localStorage.getItem(k)", key))
                state = _with_charts(state) if name != "pipelines" else {**state, "selectedColumns": PIPELINE_COLUMNS}
                page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, json.dumps(state)])
            page.reload()
            page.wait_for_timeout(12000)  # charts load their code and data lazily
            path = out_dir / f"mlflow-{name}.png"
            page.screenshot(path=str(path))
            shots.append(path)
            print(f"wrote {path}")
        chrome.close()
    return shots


def screenshots(uri: str, out_dir: Path, port: int) -> list[Path]:
    """Serve the store with `mlflow ui`, shoot each view with headless Chromium, stop the server."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("error: chromium not found: install Debian's package (apt-get install chromium)")
    base = f"http://127.0.0.1:{port}"
    targets = views(uri)
    # Its own process group: `mlflow ui` starts a web server and job workers, all stopped together below.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(base, server)
        out_dir.mkdir(parents=True, exist_ok=True)
        return _shoot(browser, targets, base, out_dir)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", required=True, help="the MLflow tracking URI (sqlite:///mlflow.db)")
    ap.add_argument("--base", default="http://127.0.0.1:5000", help="where the UI is served, for the links")
    ap.add_argument("--screenshots", type=Path, help="write mlflow-<view>.png here instead of printing links")
    ap.add_argument("--port", type=int, default=5000, help="port for the UI served while taking screenshots")
    args = ap.parse_args(argv)
    if args.screenshots:
        screenshots(args.uri, args.screenshots, args.port)
        return
    for name, fragment in views(args.uri).items():
        print(f"{name:>9}: {args.base}/{fragment}")


if __name__ == "__main__":
    main()
