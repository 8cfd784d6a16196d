"""MLflow tracking shared by every stage: params, metrics and small artifacts into one experiment.

The store is `MLFLOW_TRACKING_URI` (the Makefile exports `sqlite:///mlflow.db` at the repo root); stages run
by plain `dvc repro` fall back to the same file. Each stage run is a child of one "pipeline" parent run, so
the stages of one `dvc repro` (or one `dvc exp run`) group together in the UI. The parent is keyed by
`PIPELINE_RUN_ID` when set (the Makefile sets one per `make repro`), else by git commit + params.yaml hash.
Runs are tagged with the git commit, the dvc.lock hash, the DVC stage and `DVC_EXP_NAME`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

from stages.config import flatten

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT = "alpaca-lora-cpu"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _file_hash(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:12] if p.exists() else "none"


def build_record() -> dict[str, str]:
    """How `make setup` built llama.cpp (scripts/llama_build.py writes <venv>/llama-build.json)."""
    import json
    import sys

    path = Path(sys.prefix) / "llama-build.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"llama_build": f"unknown (no {path}: llama-cpp-python was not installed by make setup)"}
    return {"llama_build": rec.get("choice", "unknown"), "llama_cmake_args": rec.get("cmake_args", "unknown"),
            "llama_build_system_info": rec.get("system_info", "unknown")}


def run_tags(stage: str) -> dict[str, str]:
    commit = _git_commit()
    pipeline = os.environ.get("PIPELINE_RUN_ID") or f"{commit[:12]}-{_file_hash('params.yaml')}"
    if os.environ.get("DVC_EXP_NAME"):
        pipeline = f"{os.environ['DVC_EXP_NAME']}-{pipeline}"
    return {
        "git_commit": commit,
        "dvc_lock": _file_hash("dvc.lock"),
        "dvc_stage": stage,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "pipeline_run": pipeline,
    }


def _parent_run(client: Any, experiment_id: str, tags: dict[str, str]) -> str:
    """Get or create the pipeline's parent run (finished at once; it only groups its children)."""
    key = tags["pipeline_run"]
    found = client.search_runs(
        [experiment_id], f"tags.pipeline_run = '{key}' and tags.kind = 'pipeline'", max_results=1
    )
    if found:
        return found[0].info.run_id
    shared = {k: v for k, v in tags.items() if k != "dvc_stage"}
    run = client.create_run(experiment_id, run_name=f"pipeline {key}", tags={**shared, "kind": "pipeline"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextlib.contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Serialise creating/migrating a SQLite store: two stages run in parallel (two `dvc repro` of disjoint
    stages, or `dvc exp run --jobs`) would otherwise race through MLflow's schema migrations and crash."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def stage_run(stage: str, params: dict, run_name: str | None = None) -> Iterator[Any]:
    """Open an MLflow run for `stage`, log its params, and yield the `mlflow` module for metrics/artifacts."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    mlflow.set_tracking_uri(uri)
    tags = run_tags(stage)
    with _store_init_lock(uri):
        experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
        parent = _parent_run(MlflowClient(), experiment.experiment_id, tags)
    _fail_orphans(MlflowClient(), experiment.experiment_id)
    tags = {**tags, "kind": "stage", "mlflow.parentRunId": parent, "host": socket.gethostname(),
            "pid": str(os.getpid()), **build_record()}
    # A run left active by an earlier crash in this process would make start_run fail ("Run already active").
    while mlflow.active_run():
        mlflow.end_run("KILLED")
    with _sigterm_as_exit(), mlflow.start_run(run_name=run_name or stage, tags=tags):
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield mlflow  # an exception (a StageError, a NativeCrash, SIGTERM) ends the run FAILED


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (dvc or a user stopping the stage) unwinds like an exception, so the run is ended FAILED."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_orphans(client: Any, experiment_id: str) -> None:
    """Stage runs still RUNNING whose process on this host is gone (killed by a signal, SIGKILL, OOM) can never
    end themselves: mark them FAILED so the UI does not show them running for ever."""
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.kind = 'stage' "
                                  f"and tags.host = '{host}'", max_results=200):
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            client.set_tag(run.info.run_id, "failure", "its process died without ending the run (killed by a signal)")
            client.set_terminated(run.info.run_id, status="FAILED")


def log_metrics(mlflow: Any, metrics: dict, prefix: str = "") -> None:
    """Log the numeric leaves of a metrics dict (the metrics JSON stays the source of truth)."""
    numeric = {k: float(v) for k, v in flatten(metrics, prefix).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric)
