"""The bad-input matrix: every case exits non-zero with one `error: ...` line naming the problem, and writes
nothing. Each case runs the stage as a user would (`python -m stages.<name> ...`) against a temp params file."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, make_records, run_module

pytestmark = [pytest.mark.failure, pytest.mark.slow]  # every case runs its entry point as a subprocess


@dataclass
class Case:
    id: str
    module: str
    expect: str                                  # regex the error line must match
    params: dict = field(default_factory=dict)   # "section.key" -> value; value DELETE removes the key
    setup: Callable[[Path], dict] | None = None  # makes input files; returns extra {placeholder: path}
    args: tuple = ()                             # CLI args; "{tmp}" and setup placeholders are filled in


DELETE = object()
OUT_ARGS = {
    "stages.prepare": ("--out", "{tmp}/out/prepared", "--metrics", "{tmp}/out/prepare.json"),
    "stages.base": ("--out", "{tmp}/out/base", "--metrics", "{tmp}/out/base.json"),
    "stages.finetune": ("--base", "{model}", "--data", "{data}", "--out", "{tmp}/out/adapter", "--checkpoints",
                        "{tmp}/out/ckpt", "--metrics", "{tmp}/out/finetune.json", "--plots", "{tmp}/out/plots",
                        "--accelerate-configs", str(ROOT / "configs/accelerate")),
    "stages.merge": ("--base", "{model}", "--adapter", "{adapter}", "--val", "{data}/val.jsonl", "--out",
                     "{tmp}/out/merged", "--metrics", "{tmp}/out/merge.json"),
    "stages.quantize": ("--type", "{qtype}", "--src", "{gguf}", "--out", "{tmp}/out/m.gguf", "--modelfile",
                        "{tmp}/out/m.Modelfile", "--metrics", "{tmp}/out/q.json"),
    "tools.generate": ("--model", "{gguf}", "--prompt", "hi", "-n", "4"),
    "stages.evaluate": ("--variant", "q4_0", "--gguf", "{gguf}", "--reference", "{tmp}/ref", "--metrics",
                        "{tmp}/out/e.json", "--generations", "{tmp}/out/e.jsonl"),
}


def write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def data_file(content: str | bytes, name: str = "data.json"):
    return lambda tmp: {"data.source": str(write(tmp, name, content))}


def non_llama_folder(tmp: Path) -> dict:
    (tmp / "gpt2").mkdir()
    write(tmp / "gpt2", "config.json", json.dumps({"model_type": "gpt2"}))
    return {"base.model": str(tmp / "gpt2")}


CASES = [
    Case("unknown-key", "stages.prepare", r"unknown key 'data\.fracton'", {"data.fracton": 0.1}),
    Case("missing-key", "stages.prepare", r"missing key 'data\.seed'", {"data.seed": DELETE}),
    Case("fraction-zero", "stages.prepare", r"data\.fraction must be in \(0, 1\]", {"data.fraction": 0}),
    Case("fraction-above-one", "stages.prepare", r"data\.fraction must be in \(0, 1\]", {"data.fraction": 1.5}),
    Case("val-size-one", "stages.prepare", r"data\.val_size must be in \(0, 1\)", {"data.val_size": 1.0}),
    Case("fraction-wrong-type", "stages.prepare", r"'data\.fraction' must be float", {"data.fraction": "1%"}),
    Case("on-invalid-unknown", "stages.prepare", r"'data\.on_invalid' must be one of drop, error",
         {"data.on_invalid": "skip"}),
    Case("data-file-missing", "stages.prepare", r"data\.source .*nope\.json: file not found",
         {"data.source": "{tmp}/nope.json"}),
    Case("data-file-empty", "stages.prepare", r"data\.source .*empty\.json: cannot read",
         setup=data_file("", "empty.json")),
    Case("data-not-json", "stages.prepare", r"cannot read \(JSONDecodeError", setup=data_file("{oops")),
    Case("data-not-a-list", "stages.prepare", r"expected a JSON list of Alpaca records, got dict",
         setup=data_file('{"instruction": "x"}')),
    Case("data-not-alpaca", "stages.prepare", r"no valid Alpaca records .*record 0: missing field \('instruction'\)",
         setup=data_file(json.dumps([{"prompt": "p", "completion": "c"}]))),
    Case("data-no-records", "stages.prepare", r"no valid Alpaca records left", setup=data_file("[]")),
    Case("data-malformed-strict", "stages.prepare", r"record 2: wrong type \('output'\)",
         {"data.on_invalid": "error"},
         setup=data_file(json.dumps(make_records(2) + [{"instruction": "x", "output": 42}]))),
    Case("data-bad-jsonl-line", "stages.prepare", r"bad\.jsonl: cannot read",
         setup=data_file('{"instruction": "a", "output": "b"}\nnot json\n', "bad.jsonl")),
    Case("unwritable-output", "stages.prepare", r"cannot create output folder",
         setup=lambda tmp: {"data.source": str(write(tmp, "d.json", json.dumps(make_records(10)))),
                            "_block": str(write(tmp, "out", "a file where a folder should be"))}),
    Case("base-unknown-form", "stages.base", r"base\.model: cannot interpret 'not a model'; accepted forms",
         {"base.model": "not a model"}),
    Case("base-unknown-builtin", "stages.base", r"unknown builtin 'llama-70b'", {"base.model": "builtin:llama-70b"}),
    Case("base-non-llama", "stages.base", r"architecture 'gpt2' is not supported", setup=non_llama_folder),
    Case("base-truncated-gguf", "stages.base", r"cut\.gguf is a damaged GGUF file",
         setup=lambda tmp: {"base.model": str(write(tmp, "cut.gguf", b"GGUF\x03\x00\x00"))}),
    Case("base-dtype-unknown", "stages.base", r"'base\.dtype' must be one of float32, bfloat16, float16",
         {"base.dtype": "int8"}),
]


def llama_config_folder(tmp: Path) -> str:
    """A LLaMA config (no weights): enough for every check that runs before weights load."""
    folder = tmp / "llama"
    folder.mkdir(exist_ok=True)
    write(folder, "config.json", json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}))
    return str(folder)


def llama_weights_folder(tmp: Path) -> str:
    """A real (random, tiny) LLaMA checkpoint, for stages that read weights before the bad input."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    LlamaForCausalLM(config).save_pretrained(tmp / "llama_w")
    return str(tmp / "llama_w")


def prepared_data(tmp: Path, n_train: int = 8, n_val: int = 2) -> str:
    folder = tmp / "data"
    folder.mkdir(exist_ok=True)
    recs = make_records(n_train + n_val)
    write(folder, "train.jsonl", "".join(json.dumps(r) + "\n" for r in recs[:n_train]))
    write(folder, "val.jsonl", "".join(json.dumps(r) + "\n" for r in recs[n_train:]))
    return str(folder)


def finetune_inputs(n_train: int = 8):
    return lambda tmp: {"{model}": llama_config_folder(tmp), "{data}": prepared_data(tmp, n_train)}


def merge_inputs(adapter_files: dict[str, str | bytes]):
    def setup(tmp: Path) -> dict:
        adapter = tmp / "adapter"
        adapter.mkdir()
        for name, content in adapter_files.items():
            write(adapter, name, content)
        return {"{model}": llama_weights_folder(tmp), "{data}": prepared_data(tmp), "{adapter}": str(adapter)}
    return setup


def gguf_file(content: bytes, qtype: str = "q4_0"):
    return lambda tmp: {"{gguf}": str(write(tmp, "model.gguf", content)), "{qtype}": qtype}


ADAPTER_CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                             "base_model_name_or_path": "x"})
GGUF_HEAD_ONLY = b"GGUF\x03\x00\x00\x00" + b"\x00" * 8

CASES += [
    Case("finetune-r-zero", "stages.finetune", r"finetune\.lora\.r must be", {"finetune.lora.r": 0},
         setup=finetune_inputs()),
    Case("finetune-dropout-one", "stages.finetune", r"finetune\.lora\.dropout", {"finetune.lora.dropout": 1.0},
         setup=finetune_inputs()),
    Case("finetune-batch-not-multiple", "stages.finetune", r"batch_size", {"finetune.batch_size": 6},
         setup=finetune_inputs()),
    Case("finetune-unknown-target-module", "stages.finetune", r"q_projj.*(q_proj|linear)",
         {"finetune.lora.target_modules": ["q_projj"]}, setup=finetune_inputs()),
    Case("finetune-cutoff-too-small", "stages.finetune", r"cutoff_len", {"finetune.cutoff_len": 8},
         setup=finetune_inputs()),
    Case("finetune-empty-train-split", "stages.finetune", r"(?i)empty|no .*record", setup=finetune_inputs(0)),
    Case("merge-missing-adapter", "stages.merge", r"(?i)adapter", setup=merge_inputs({})),
    Case("merge-corrupt-adapter", "stages.merge", r"(?i)adapter",
         setup=merge_inputs({"adapter_config.json": ADAPTER_CONFIG, "adapter_model.safetensors": b"\x00garbage"})),
    Case("quantize-unknown-type", "stages.quantize", r"q9_9.*(q4_0|valid)", setup=gguf_file(b"GGUF", "q9_9")),
    Case("generate-not-a-gguf", "tools.generate", r"not a GGUF file", setup=gguf_file(b"PK\x03\x04zip")),
    Case("generate-truncated-gguf", "tools.generate", r"(?i)damaged|truncated", setup=gguf_file(GGUF_HEAD_ONLY)),
    Case("evaluate-missing-variant-file", "stages.evaluate", r"variant q4_0: GGUF file .*nope\.gguf not found",
         setup=lambda tmp: {"{gguf}": str(tmp / "nope.gguf")}),
]


def patched_params(tmp: Path, changes: dict) -> Path:
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        if dotted.startswith(("_", "{")):
            continue
        *parents, key = dotted.split(".")
        node = doc
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[key]
        else:
            node[key] = value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    extra = case.setup(tmp_path) if case.setup else {}
    params = patched_params(tmp_path, {**case.params, **extra})
    args = case.args or OUT_ARGS[case.module]
    fills = {"{tmp}": str(tmp_path), **{k: v for k, v in extra.items() if k.startswith("{")}}
    args = [a for a in args]
    for key, value in fills.items():
        args = [a.replace(key, value) for a in args]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = run_module(case.module, "--params", str(params), *args,
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0, proc.stdout[-1000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(case.expect, lines[0]), lines[0]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                   if not p.name.startswith("mlflow.db"))
    assert after == before, f"wrote {set(after) - set(before)}"


def test_matrix_covers_at_least_twenty_distinct_inputs():
    assert len({c.id for c in CASES}) == len(CASES) >= 20
