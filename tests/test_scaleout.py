"""Scale-out path, in the small: stages log to an MLflow tracking server over loopback HTTP.
(The DVC remote round trip runs on the full pipeline in test_pipeline.py.)"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from alpaca_lora_cpu.launch import free_port

pytestmark = pytest.mark.slow


def wait_for(port: int, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def test_stage_logs_to_mlflow_server_over_loopback(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(port, server)
        uri = f"http://127.0.0.1:{port}"
        out = tmp_path / "prepared"
        proc = subprocess.run(
            [sys.executable, "-m", "stages.prepare", "--out", str(out), "--metrics", str(tmp_path / "m.json")],
            cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"},
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("alpaca-lora-cpu")
        runs = client.search_runs([exp.experiment_id], "tags.dvc_stage = 'prepare'")
        assert len(runs) == 1 and runs[0].data.metrics["train_records"] > 0
        # The artifact went through the server's proxy into its artifact folder, not a local mlruns/.
        assert any(p.name == "manifest.json" for p in (tmp_path / "artifacts").rglob("*"))
    finally:
        server.terminate()
        server.wait(timeout=30)
