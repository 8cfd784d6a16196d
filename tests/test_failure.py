"""Failure injection: kill -9 a stage mid-way, rerun, and the pipeline completes with correct outputs; a
concurrent second `dvc repro` is refused by DVC's lock without harming the first."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _env(repo: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}


def start(repo: Path, *args: str) -> subprocess.Popen:
    # A new session, so kill -9 reaches dvc and the stage process it started.
    return subprocess.Popen(["dvc", *args], cwd=repo, env=_env(repo), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"dvc {args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def staging_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.glob(".*.tmp")] if parent.exists() else []


def kill_mid_write(repo: Path, stage: str, out: Path) -> None:
    """Start `dvc repro stage`, kill -9 the whole process group once it is writing `out`'s staging copy."""
    proc = start(repo, "repro", stage)
    wait_until(lambda: staging_dirs(out.parent) or proc.poll() is not None, 600, f"{stage} to start writing")
    assert proc.poll() is None, f"{stage} finished before it could be killed:\n{proc.stdout.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_kill_9_during_base_then_rerun_completes(repo_copy):
    out = repo_copy / "models/base"
    kill_mid_write(repo_copy, "base", out)
    # Nothing half-written where a downstream stage (or DVC's cache) would pick it up.
    assert not out.exists()
    assert "base" in dvc(repo_copy, "status", "base").stdout
    dvc(repo_copy, "repro", "base")
    metrics = json.loads((repo_copy / "reports/metrics/base.json").read_text())
    assert (out / "model.safetensors").stat().st_size > 400e6 and metrics["architecture"] == "llama"
    assert not staging_dirs(out.parent)
    assert "up to date" in dvc(repo_copy, "status", "base").stdout.lower()


def test_concurrent_repro_is_refused_by_the_lock(repo_copy):
    first = start(repo_copy, "repro", "base")
    wait_until(lambda: (repo_copy / ".dvc/tmp/rwlock").exists() or first.poll() is not None, 120, "the lock")
    time.sleep(1)
    assert first.poll() is None, "base finished too soon to test the lock"
    clash = subprocess.run(["dvc", "repro", "base"], cwd=repo_copy, env=_env(repo_copy), capture_output=True,
                           text=True, timeout=300)
    assert clash.returncode != 0 and "busy" in clash.stdout + clash.stderr
    # A disjoint stage may run alongside; both share the MLflow store without racing its set-up.
    dvc(repo_copy, "repro", "prepare")
    assert first.wait(timeout=900) == 0, first.stdout.read()[-2000:]
    assert (repo_copy / "models/base/model.safetensors").is_file()
    assert "up to date" in dvc(repo_copy, "status").stdout.lower()
