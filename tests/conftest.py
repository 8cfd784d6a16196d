"""Shared fixtures: a tiny random LLaMA (real tokenizer of the embedded model) and a temp copy of the repo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a copy of the repo needs; outputs (incl. the committed report snapshot), caches and the venv stay behind.
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "models", "prepared", "reports", "mlflow.db", "mlruns", "mlartifacts",
                                     "__pycache__", ".pytest_cache", "*.tmp", "cache", "tmp")


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


@pytest.fixture
def records():
    return make_records


def run_module(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 900):
    """Run `python -m module args` as a user would; returns CompletedProcess (text)."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def git_identity():
    """Tests commit in temp repos (and `dvc exp run` commits too): give git an identity on any machine."""
    for key, value in (("GIT_AUTHOR_NAME", "tests"), ("GIT_AUTHOR_EMAIL", "tests@localhost"),
                       ("GIT_COMMITTER_NAME", "tests"), ("GIT_COMMITTER_EMAIL", "tests@localhost")):
        os.environ.setdefault(key, value)


def copy_repo(dst: Path) -> Path:
    """A copy of the working tree (no outputs, caches or venv) turned into its own git repo, as DVC needs."""
    shutil.copytree(ROOT, dst, ignore=COPY_IGNORE)
    # A repo-local identity too: `dvc exp run` commits through its own git backend, which may ignore GIT_* vars.
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "tests"],
                ["git", "config", "user.email", "tests@localhost"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def builtin_tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded model's tokenizer, saved once as a normal HF tokenizer folder."""
    from transformers import AutoTokenizer

    from stages.base import resolve

    src = Path(resolve("builtin:smollm2-135m-instruct").ref)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_tokenizer_dir) -> Path:
    """A tiny random LlamaForCausalLM (2 layers, GQA 4q/2kv heads) with the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


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
    """llama.cpp's quantizer through llama-cpp-python (qtype: q8_0, q4_0, …)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"quantizing {src} to {qtype} failed")
    return dst


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """`tiny_model_dir` converted to an f16 GGUF by llama.cpp's converter (session-scoped, shared)."""
    from stages.convert import convert_hf

    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny-f16.gguf"
    convert_hf(tiny_model_dir, out, "f16")
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter with non-zero B on `tiny_model_dir`."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="session")
def tiny_merged(tmp_path_factory, tiny_model_dir, tiny_adapter) -> tuple[Path, dict]:
    """(merged folder, merge metrics): the tiny model merged with `tiny_adapter` by the merge stage's `run`."""
    from stages.config import ExportParams, PromptParams
    from stages.merge import run

    root = tmp_path_factory.mktemp("merged")
    params = ExportParams(dtype="fp32", max_shard_size="2MB", consolidated=True, gate_prompts=3,
                          gate_max_tokens=64, max_logit_diff=1e-3)
    metrics = run(params, PromptParams(template="alpaca"), tiny_model_dir, tiny_adapter,
                  write_val(root / "val.jsonl"), root / "merged")
    return root / "merged", metrics


@pytest.fixture(scope="session")
def tiny_gguf_quants(tiny_gguf) -> dict[str, Path]:
    """q8_0 and q4_0 of `tiny_gguf` (k-quants need rows of 256; the tiny model's are 64 wide)."""
    return {q: quantize_gguf(tiny_gguf, tiny_gguf.with_name(f"model-{q}.gguf"), q) for q in ("q8_0", "q4_0")}
