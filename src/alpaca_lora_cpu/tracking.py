"""MLflow tracking shared by every stage: params, metrics and small artifacts into one experiment.

The store is `MLFLOW_TRACKING_URI` (the Makefile exports `sqlite:///mlflow.db` at the repo root); stages run
by plain `dvc repro` fall back to the same file. The experiment carries `mlflow.experimentKind`, so MLflow 3's
UI opens it on its runs table rather than the GenAI overview.

Each stage run is a child of one "pipeline" parent run, so the stages of one `dvc repro` (or one `dvc exp run`)
group together in the UI. The parent is keyed by `PIPELINE_RUN_ID` when set (the Makefile sets one per
`make repro`), else by git commit + params.yaml hash. It carries the whole params.yaml, flattened; it is RUNNING
while one of its stages runs and its end time moves with each stage's end, so it spans the pipeline; the
report stage adds the headline metrics, the report and the recommended model. Runs are tagged with the git
commit, the dvc.lock hash, the DVC stage and `DVC_EXP_NAME`.

Metrics: `write_stage_metrics` writes a stage's few flat numbers (the DVC metric; MLflow mirrors them) and its
whole record beside them as `<name>.details.json` (also an MLflow artifact).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.config import flatten
from alpaca_lora_cpu.errors import StageError

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT = "alpaca-lora-cpu"
# MLflow 3's UI picks the experiment's landing view from this tag; "custom_model_development" is its
# model-training view (runs table and charts). Checked in a browser: docs/mlflow-runs.png.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def git_commit(ignore: str | None = None) -> str:
    """HEAD, with `-dirty` when tracked files differ from it (`ignore`: a file that does not count, e.g. the
    results file a benchmark is about to rewrite)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        spec = ["--", ".", f":(exclude){ignore}"] if ignore else []
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *spec],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _file_hash(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:12] if p.exists() else "none"


def build_record() -> dict[str, str]:
    """How `make setup` built llama.cpp (tools/llama_build.py writes <venv>/llama-build.json)."""
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
    commit = git_commit()
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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _parent_run(client: Any, experiment_id: str, tags: dict[str, str], params_file: str = "params.yaml") -> str:
    """Get or create the pipeline's parent run and mark it RUNNING while a stage runs; a new parent logs the
    whole params file, flattened."""
    key = tags["pipeline_run"]
    found = client.search_runs(
        [experiment_id], f"tags.pipeline_run = '{key}' and tags.kind = 'pipeline'", max_results=1
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    shared = {k: v for k, v in tags.items() if k != "dvc_stage"}
    run = client.create_run(experiment_id, start_time=_now_ms(), run_name=f"pipeline {key}",
                            tags={**shared, "kind": "pipeline"})
    _log_params_file(client, run.info.run_id, params_file)
    return run.info.run_id


def _log_params_file(client: Any, run_id: str, params_file: str) -> None:
    import yaml
    from mlflow.entities import Param

    try:
        raw = yaml.safe_load(Path(params_file).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # the stage's own load_params reports a bad file; the parent just has no params then
    flat = [Param(k, str(v)[:500]) for k, v in flatten(raw).items()]
    for i in range(0, len(flat), 100):  # MLflow's log_batch takes at most 100 params per call
        client.log_batch(run_id, params=flat[i:i + 100])


def _end_parent(client: Any, parent: str, failed: bool) -> None:
    """The stage ended: the parent's end time moves to now, so it spans every stage run so far."""
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED", end_time=_now_ms())


def _experiment(mlflow: Any, client: Any) -> Any:
    experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment


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


STORE_FIX = "point it at a new file (sqlite:///mlflow.db) or move the damaged one away"
SQLITE_MAGIC = b"SQLite format 3\x00"


def check_store(uri: str) -> None:
    """The tracking store, checked before MLflow touches it: a local SQLite file must be an SQLite database (or
    not exist yet) in a folder that is one; a local file store must be a folder. One line naming the URI if not."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        kind = "SQLite file"
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri.removeprefix("file://").removeprefix("file:"))
        kind = "folder"
    else:
        return  # a server (http, databricks, …): MLflow reports its own connection errors
    existing = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise StageError(f"MLFLOW_TRACKING_URI={uri}: {existing} is a file, so the {kind} {path} cannot be "
                         f"created under it; {STORE_FIX}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise StageError(f"MLFLOW_TRACKING_URI={uri} is a file, not a tracking folder; {STORE_FIX}")
    if kind == "SQLite file" and path.exists():
        try:
            with open(path, "rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise StageError(f"MLFLOW_TRACKING_URI={uri}: cannot read {path} ({exc.strerror}); {STORE_FIX}") from exc
        if path.is_dir() or (head and head != SQLITE_MAGIC):
            raise StageError(f"MLFLOW_TRACKING_URI={uri} is not an SQLite database; {STORE_FIX}")


@contextlib.contextmanager
def stage_run(stage: str, params: dict, run_name: str | None = None) -> Iterator[Any]:
    """Open an MLflow run for `stage`, log its params, and yield the `mlflow` module for metrics/artifacts."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    tags = run_tags(stage)
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with _store_init_lock(uri):
            experiment = _experiment(mlflow, client)
            parent = _parent_run(client, experiment.experiment_id, tags)
    except (MlflowException, SQLAlchemyError, OSError) as exc:  # a store that opens but does not work
        raise StageError(f"MLFLOW_TRACKING_URI={uri}: the tracking store does not work ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); {STORE_FIX}") from exc
    _fail_orphans(client, experiment.experiment_id)
    tags = {**tags, "kind": "stage", "mlflow.parentRunId": parent, "host": socket.gethostname(),
            "pid": str(os.getpid()), **build_record()}
    # A run left active by an earlier crash in this process would make start_run fail ("Run already active").
    while mlflow.active_run():
        mlflow.end_run("KILLED")
    failed = True
    try:
        with _sigterm_as_exit(), mlflow.start_run(run_name=run_name or stage, tags=tags):
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
            yield mlflow  # an exception (a StageError, a NativeCrash, SIGTERM) ends the run FAILED
        failed = False
    finally:
        _end_parent(client, parent, failed)


def pipeline_run_id(mlflow: Any) -> str:
    """The parent ("pipeline") run of the active stage run."""
    return mlflow.active_run().data.tags["mlflow.parentRunId"]


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
    end themselves: mark them and their pipeline run FAILED so the UI does not show them running for ever."""
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.kind = 'stage' "
                                  f"and tags.host = '{host}'", max_results=200):
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            client.set_tag(run.info.run_id, "failure", "its process died without ending the run (killed by a signal)")
            client.set_terminated(run.info.run_id, status="FAILED")
            parent = run.data.tags.get("mlflow.parentRunId")
            if parent and client.get_run(parent).info.status == "RUNNING":
                client.set_terminated(parent, status="FAILED")


def lookup(record: Mapping, path: str) -> Any:
    """The value at a dotted path of a nested record (`speed.gen_tps`), or None."""
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def headline(record: Mapping, keys: Mapping[str, str] | Sequence[str], strict: bool = True) -> dict[str, float]:
    """The flat numbers a stage publishes as its DVC metric: `keys` maps each metric name to a dotted path in the
    stage's record (a plain list: same name). Booleans count as 0/1; values keep 6 significant digits, enough
    for any comparison here and short enough for `dvc metrics show` to fit a terminal. `strict=False` (a failed
    gate's partial record) drops keys that are missing instead of failing."""
    paths = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
    out: dict[str, float] = {}
    for name, path in paths.items():
        value = lookup(record, path)
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)) or value != value:
            if strict:
                raise StageError(f"internal: metric {name!r} ({path}) is {value!r}, not a number")
            continue
        out[name] = value if isinstance(value, int) else float(f"{value:.6g}")
    return out


def write_stage_metrics(mlflow: Any, metrics_path: str | os.PathLike, record: Mapping,
                        keys: Mapping[str, str] | Sequence[str], strict: bool = True) -> dict[str, float]:
    """Write the stage's whole record (`<name>.details.json`) and its flat metrics JSON; mirror both in MLflow
    (`mlflow` None: files only)."""
    from alpaca_lora_cpu.files import details_path, write_json

    flat = headline(record, keys, strict)
    write_json(details_path(metrics_path), record)
    write_json(metrics_path, flat)
    if mlflow is not None:
        if flat:
            mlflow.log_metrics({k: float(v) for k, v in flat.items()})
        mlflow.log_artifact(str(details_path(metrics_path)))
    return flat
