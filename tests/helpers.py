"""Shared test helpers (plain functions; fixtures live in conftest.py): synthetic records, running entry points as a
user would, a temp copy of the repo, `dvc` in it, and shrinking params.yaml so a whole pipeline runs in minutes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# What a copy of the repo needs; outputs (incl. the committed report snapshot), caches and the venv stay behind.
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "models", "prepared", "reports", "mlflow.db", "mlruns",
                                     "mlartifacts", "__pycache__", ".pytest_cache", "*.tmp", "cache", "tmp",
                                     "*.egg-info")


def write_records(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def make_records(n: int, with_input_every: int = 3) -> list[dict]:
    """Synthetic, unique Alpaca-format records (tests never use the shared Alpaca slice)."""
    return [
        {"instruction": f"Add {i} and {i + 1}.",
         "input": f"numbers: {i}, {i + 1}" if i % with_input_every == 0 else "",
         "output": f"The sum of {i} and {i + 1} is {2 * i + 1}."}
        for i in range(n)
    ]


def run_module(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 900):
    """Run `python -m module args` as a user would; returns CompletedProcess (text)."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def copy_repo(dst: Path) -> Path:
    """A copy of the working tree (no outputs, caches or venv) turned into its own git repo, as DVC needs."""
    shutil.copytree(ROOT, dst, ignore=COPY_IGNORE)
    # A repo-local identity too: `dvc exp run` commits through its own git backend, which may ignore GIT_* vars.
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "tests"],
                ["git", "config", "user.email", "tests@localhost"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


def write_val(path: Path, n: int = 4) -> Path:
    """A small validation JSONL in the prepared format (synthetic records)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(n)), encoding="utf-8")
    return path


def make_adapter(model_dir: Path, out: Path, trained: bool = True, r: int = 4) -> Path:
    """A PEFT LoRA adapter on `model_dir`; trained=False leaves B at zero (a no-op adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=not trained, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    return out


def quantize_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """llama.cpp's quantizer (the project's one ctypes call, quantizer.quantize_here; qtype: q8_0, q4_0, …)."""
    from alpaca_lora_cpu.quantizer import Plan, quantize_here

    rc, _, lines = quantize_here(str(src), str(dst), Plan(qtype, qtype, False), 2)
    if rc != 0:
        raise RuntimeError(f"quantizing {src} to {qtype} failed: {lines[-1:]}")
    return dst


def dvc(repo: Path, *args: str, check: bool = True, timeout: int = 3600) -> subprocess.CompletedProcess:
    """`dvc <args>` in `repo`, with the repo's own MLflow store; raises with dvc's output when it fails."""
    proc = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"})
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _merge(doc: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge(doc[key], value)
        else:
            doc[key] = value


def shrink_params(repo: Path, quants: list[str], overrides: dict | None = None) -> None:
    """Same stages and gates, small loops: one 4-sample optimizer step, the given quant levels, a few prompts;
    `overrides` (nested, like params.yaml) changes more, e.g. a tiny base model."""
    path = repo / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    _merge(doc, {
        "finetune": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "warmup_steps": 0, "eval_steps": 1,
                     "save_steps": 1},
        "export": {"gate_prompts": 2, "gate_max_tokens": 64},
        "convert": {"gate_prompts": 2, "gate_max_tokens": 64},
        "quantize": {"types": quants},
        "reference": {"max_records": 3, "max_response_tokens": 32, "generate_records": 2,
                      "showcase_prompts": doc["reference"]["showcase_prompts"][:2], "ifeval_prompts": 4,
                      "ifeval_max_new_tokens": 16},
        "intervals": {"resamples": 500},
        "evaluate": {"max_new_tokens": 16, "speed": {"prompt_tokens": 64, "gen_tokens": 16, "runs": 3}},
        "imatrix": {"max_tokens": 256, "chunk_size": 128},
        "search": {"calibration_tokens": 128, "types": ["q4_0", "q8_0"], "top_k": 32, "verify": 1},
    })
    _merge(doc, overrides or {})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


# What a finetune-stage run on the tiny model changes in params.yaml (a few seconds, every code path of the real
# stage). Every other key is params.yaml's own, so a new finetune param needs no edit here.
TINY = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "epochs": 1, "learning_rate": 5.0e-3, "batch_size": 4, "micro_batch_size": 2, "cutoff_len": 96,
    "warmup_steps": 0, "group_by_length": True, "precision": "fp32", "eval_steps": 2, "save_steps": 2, "seed": 0,
    "max_steps": 4,
}


def setup_run(tmp_path: Path, model_dir: Path, n_train: int = 16, n_val: int = 4, **overrides) -> tuple[Path, list]:
    """params.yaml (the repo's, with TINY training and `overrides` of finetune keys) + data folder for a run on
    `model_dir`; (workdir, CLI args)."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    _merge(doc["finetune"], TINY)
    _merge(doc["finetune"], overrides)
    doc["prompt"] = {"template": "alpaca"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    records = make_records(n_train + n_val)
    for name, rows in (("train.jsonl", records[:n_train]), ("val.jsonl", records[n_train:])):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--params", str(tmp_path / "params.yaml"), "--base", str(model_dir), "--data", str(data),
            "--out", str(tmp_path / "adapter"), "--checkpoints", str(tmp_path / "ckpt"),
            "--metrics", str(tmp_path / "finetune.json"), "--plots", str(tmp_path / "plots"),
            "--accelerate-configs", str(ROOT / "configs/accelerate")]
    return tmp_path, args


def finetune(cwd: Path, args: list, env: dict | None = None):
    return run_module("stages.finetune", *args, cwd=cwd, env={"PYTHONPATH": str(ROOT), **(env or {})})


def dvc_commands(repo: Path = ROOT) -> dict[str, str]:
    """Every stage instance's command in dvc.yaml (`evaluate@q4_0`, …; foreach lists and dicts expanded from
    params.yaml as DVC does), whitespace normalised: the one place a stage's command line is written."""
    import functools
    import re

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    out = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            out[name] = " ".join(stage["cmd"].split())
            continue
        items = stage["foreach"]
        if isinstance(items, str):  # ${section.key} from params.yaml
            items = functools.reduce(lambda node, part: node[part], items.strip("${}").split("."), params)
        pairs = items.items() if isinstance(items, dict) else ((i, i) for i in items)
        for key, item in pairs:
            def fill(m, key=key, item=item):
                path = m.group(1).split(".")
                if path[0] == "key":
                    return str(key)
                value = item
                for p in path[1:]:
                    value = value[p]
                return str(value)
            out[f"{name}@{key}"] = " ".join(re.sub(r"\$\{((?:item|key)(?:\.\w+)*)\}", fill, stage["do"]["cmd"]).split())
    return out


def stage_options() -> dict[str, tuple[str, ...]]:
    """stages.<module> → the options its dvc.yaml command passes (besides --params)."""
    import re

    out = {}
    for cmd in dvc_commands().values():
        module = re.search(r"-m (stages\.\w+)", cmd).group(1)
        out[module] = tuple(o[2:] for o in cmd.split() if o.startswith("--") and o != "--params")
    return out
