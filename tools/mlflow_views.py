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
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

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
            "pipelines": url({"workflowType": "machine_learning", "searchFilter": "tags.kind = 'pipeline'"})}


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


def screenshots(uri: str, out_dir: Path, port: int) -> list[Path]:
    """Serve the store with `mlflow ui`, shoot each view with headless Chromium, stop the server."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("error: chromium not found: install Debian's package (apt-get install chromium)")
    base = f"http://127.0.0.1:{port}"
    targets = views(uri)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shots = []
    try:
        _wait_for(base, server)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, fragment in targets.items():
            path = out_dir / f"mlflow-{name}.png"
            # Virtual time lets the charts' lazily loaded code and data arrive before the shot.
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={WINDOW}", "--virtual-time-budget=60000",
                            f"--screenshot={path}", f"{base}/{fragment}"],
                           check=True, capture_output=True, timeout=300)
            shots.append(path)
            print(f"wrote {path}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return shots


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
