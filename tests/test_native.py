"""Native crashes are errors, not deaths: a child killed by a signal becomes one line naming the signal, the file,
the likely cause and the fix, and the stage's MLflow run ends FAILED. The signals are raised for real in child
processes (the AMX fault itself cannot happen on every CPU)."""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket

import pytest
from helpers import run_module

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.native import NativeCrash, call_in_child


def _fail_with_stage_error(msg: str) -> None:
    raise StageError(msg)


@pytest.mark.parametrize("sig, words", [(signal.SIGILL, ["SIGILL", "instructions", "make setup LLAMA_CMAKE_ARGS=safe"]),
                                        (signal.SIGSEGV, ["SIGSEGV", "invalid memory", "re-create the file"]),
                                        (signal.SIGABRT, ["SIGABRT", "GGML_ASSERT"])])
def test_child_killed_by_a_signal_is_a_one_line_error(sig, words):
    with pytest.raises(NativeCrash) as info:
        call_in_child(signal.raise_signal, sig, file="models/gguf/finetuned-q8_0.gguf", action="evaluating")
    msg = str(info.value)
    assert info.value.signum == sig and isinstance(info.value, StageError)
    assert "\n" not in msg and "models/gguf/finetuned-q8_0.gguf" in msg
    for w in words:
        assert w in msg


def test_child_results_and_exceptions_come_back():
    assert call_in_child(divmod, 7, 2) == (3, 1)
    with pytest.raises(StageError, match="bad record 3"):
        call_in_child(_fail_with_stage_error, "bad record 3")


def test_fault_injection_applies_to_every_child(monkeypatch):
    monkeypatch.setenv("LLAMA_CHILD_FAULT", "SIGSEGV")
    with pytest.raises(NativeCrash, match="SIGSEGV"):
        call_in_child(divmod, 7, 2)


def _tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _runs(uri, name):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["alpaca-lora-cpu"], filter_string=f"attributes.run_name = '{name}'",
                              output_format="list")


@pytest.mark.parametrize("fault", ["SIGILL", "SIGSEGV"])
@pytest.mark.slow
def test_quantize_stage_crash_is_one_line_and_a_failed_run(tmp_path, tiny_gguf, fault):
    """The quantize stage, run as dvc runs it, with its llama.cpp child dying: exit 2, one error line, a FAILED
    MLflow run (never RUNNING), no output left behind."""
    out = tmp_path / "gguf" / "finetuned-q8_0.gguf"
    uri = _tracking_uri(tmp_path)
    proc = run_module("stages.quantize", "--params", "params.yaml", "--type", "q8_0", "--src", str(tiny_gguf),
                      "--out", str(out), "--modelfile", str(tmp_path / "gguf" / "finetuned-q8_0.Modelfile"),
                      "--metrics", str(tmp_path / "q8_0.json"),
                      env={"LLAMA_CHILD_FAULT": fault, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: llama.cpp died with " + fault) and str(tiny_gguf) in last, last
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "q8_0.json").exists()
    leftovers = list((tmp_path / "gguf").iterdir()) if (tmp_path / "gguf").exists() else []
    assert leftovers == []
    (run,) = _runs(uri, "quantize@q8_0")
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_generate_crash_is_one_line(tiny_gguf):
    proc = run_module("tools.generate", "--model", str(tiny_gguf), "-n", "4", "--prompt", "Hi",
                      env={"LLAMA_CHILD_FAULT": "SIGILL"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: llama.cpp died with SIGILL")
    assert "Traceback" not in proc.stderr


def _dead_pid() -> int:
    proc = multiprocessing.get_context("spawn").Process(target=os.getpid)
    proc.start()
    proc.join()
    return proc.pid


def test_run_of_a_process_killed_outright_is_marked_failed_by_the_next_stage(tmp_path, monkeypatch):
    """SIGKILL (or a SIGILL outside any child) leaves a RUNNING run; the next stage run on this host ends it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from alpaca_lora_cpu.tracking import stage_run

    uri = _tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("alpaca-lora-cpu")
    client = MlflowClient()
    orphan = client.create_run(exp.experiment_id, run_name="quantize@q4_0",
                               tags={"kind": "stage", "host": socket.gethostname(), "pid": str(_dead_pid())})
    alive = client.create_run(exp.experiment_id, run_name="evaluate q4_0",
                              tags={"kind": "stage", "host": socket.gethostname(), "pid": str(os.getppid())})
    with stage_run("base", {"x": 1}):
        pass
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process is alive: left alone
    client.set_terminated(alive.info.run_id)


def test_stage_error_inside_a_run_ends_it_failed(tmp_path, monkeypatch):
    from alpaca_lora_cpu.tracking import stage_run

    uri = _tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError):
        with stage_run("merge", {}, run_name="merge-fails"):
            raise StageError("gate failed")
    (run,) = _runs(uri, "merge-fails")
    assert run.info.status == "FAILED"
