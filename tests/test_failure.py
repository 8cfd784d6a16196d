"""Failure injection on a tiny but complete pipeline (the tiny random LLaMA as base.model, every stage real):
kill -9 each heavy stage mid-way, rerun, and the pipeline completes with the same outputs; nothing partial is
ever left where a later stage or DVC's cache could pick it up. A concurrent second `dvc repro` on the same
outputs is refused by DVC's lock without harming the first."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import copy_repo, dvc, shrink_params

from alpaca_lora_cpu.files import sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.failure]
QUANTS = ["q8_0", "q4_0"]  # the tiny model's 64-wide rows rule out k-quants


def tiny_params(repo: Path, model_dir: Path) -> None:
    """The shrunk pipeline on the tiny random model: its own base, a smaller sample, even smaller loops."""
    shrink_params(repo, QUANTS, {
        "base": {"model": str(model_dir)}, "data": {"max_samples": 24},
        "finetune": {"max_steps": 2, "eval_steps": 2, "cutoff_len": 64},
        "export": {"gate_max_tokens": 32}, "convert": {"gate_max_tokens": 32, "min_top1_agreement": 0.9},
        "reference": {"max_records": 2, "max_response_tokens": 16, "generate_records": 1,
                      "showcase_prompts": ["Building a website can be done in 10 simple steps:"]},
        "evaluate": {"max_new_tokens": 8, "speed": {"prompt_tokens": 16, "gen_tokens": 4}},
    })


def _env(repo: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, tiny_model_dir, git_identity) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("tiny") / "repo")
    tiny_params(repo, tiny_model_dir)
    dvc(repo, "repro")
    return repo


def stage_pid(repo: Path, module: str) -> int | None:
    """The pid of `python -m module` running in `repo` (other repos may run the same stage)."""
    out = subprocess.run(["pgrep", "-f", "--", f"-m {module} "], capture_output=True, text=True).stdout.split()
    for pid in map(int, out):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(repo):
                return pid
        except OSError:
            continue
    return None


def kill_mid_stage(repo: Path, stage: str, module: str, staging_parent: Path) -> str:
    """Force-run `stage`, kill -9 dvc and the stage once it is writing (or 2 s after it starts); say when."""
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=repo, env=_env(repo), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, started = time.time() + 600, None
    while time.time() < deadline and proc.poll() is None:
        if started is None and stage_pid(repo, module):
            started = time.time()
        if started and (list(staging_parent.glob(".*.tmp")) or time.time() - started > 2):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"{stage} ended before the kill:\n{proc.stdout.read()[-1500:]}"
    when = "while writing" if list(staging_parent.glob(".*.tmp")) else "mid-run"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return when


KILLS = [
    ("merge", "stages.merge", "models/merged", "models"),
    ("convert@finetuned", "stages.convert", "models/gguf/finetuned-reference.gguf", "models/gguf"),
    ("quantize@q4_0", "stages.quantize", "models/gguf/finetuned-q4_0.gguf", "models/gguf"),
    ("evaluate@q4_0", "stages.evaluate", "reports/metrics/evaluate/q4_0.details.json", "reports/metrics/evaluate"),
]


def digest(path: Path) -> str:
    if path.is_dir():
        return ",".join(f"{p.name}:{sha256_file(p)}" for p in sorted(path.iterdir()))
    return sha256_file(path)


@pytest.mark.parametrize("stage, module, output, staging", KILLS, ids=[k[0] for k in KILLS])
def test_kill_9_mid_stage_then_rerun_restores_the_same_output(tiny_pipeline, stage, module, output, staging):
    out = tiny_pipeline / output
    deterministic = not stage.startswith("evaluate")  # evaluate records timings
    before = digest(out) if deterministic else None
    when = kill_mid_stage(tiny_pipeline, stage, module, tiny_pipeline / staging)
    # Killed mid-run: the output is gone (DVC clears outs before a run) or whole, never partial.
    if out.exists() and deterministic:
        assert digest(out) == before, f"partial {output} after a kill {when}"
    dvc(tiny_pipeline, "repro")
    assert not list((tiny_pipeline / staging).glob(".*.tmp")), "staging copies left behind"
    if deterministic:
        assert digest(out) == before
    else:
        assert json.loads(out.read_text())["variant"] == "q4_0"
    assert json.loads(dvc(tiny_pipeline, "status", "--json").stdout) == {}


def test_concurrent_repro_is_refused_by_the_lock(tiny_pipeline):
    first = subprocess.Popen(["dvc", "repro", "-f", "-s", "merge"], cwd=tiny_pipeline, env=_env(tiny_pipeline),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not stage_pid(tiny_pipeline, "stages.merge") and first.poll() is None:
        time.sleep(0.05)
    clash = subprocess.run(["dvc", "repro", "-f", "-s", "merge"], cwd=tiny_pipeline, env=_env(tiny_pipeline),
                           capture_output=True, text=True, timeout=300)
    assert clash.returncode != 0 and "busy" in clash.stdout + clash.stderr, clash.stdout + clash.stderr
    assert first.wait(timeout=900) == 0, first.stdout.read()[-2000:]
    assert json.loads(dvc(tiny_pipeline, "status", "--json").stdout) == {}
