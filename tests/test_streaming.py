"""Streaming stages: the layer-by-layer forward gives the whole model's logits, the streamed merge, consolidate and
base give the bytes the whole-model paths give, and on a synthetic model of a few hundred MB each streaming stage's
peak memory stays within a few shards, measured in a child process (under a cgroup limit where the machine has
one). The plan's refusal names the params that would make a stage fit."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, run_module, write_val

from alpaca_lora_cpu.config import ExportParams, PromptParams


def weights_of(folder: Path) -> dict:
    from alpaca_lora_cpu.shards import Weights

    w = Weights(folder)
    return {n: w.get(n) for n in w.names()}


@pytest.mark.parametrize("tied", [True, False])
def test_the_layerwise_forward_is_the_whole_models(tmp_path, tied):
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from alpaca_lora_cpu.layerwise import forward
    from alpaca_lora_cpu.shards import Weights

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
                     ).save_pretrained(tmp_path)
    whole = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    seqs = [[1, 5, 7, 9, 11], list(range(3, 40))]
    with torch.no_grad():
        expected = [whole(torch.tensor([s])).logits[0].numpy() for s in seqs]
    got = forward(AutoConfig.from_pretrained(tmp_path), Weights(tmp_path).get, seqs)
    assert all((e == g).all() for e, g in zip(expected, got, strict=True))  # bit for bit


def test_the_unmerged_lora_forward_is_peft_s(tiny_model_dir, tiny_adapter):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from alpaca_lora_cpu import lora
    from alpaca_lora_cpu.layerwise import Lora, forward
    from alpaca_lora_cpu.shards import Weights

    seqs = [[1, 5, 7, 9, 11, 13], list(range(20, 50))]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                     tiny_adapter).eval()
    with torch.no_grad():
        expected = [peft(torch.tensor([s])).logits[0].numpy() for s in seqs]
    adapter = lora.read(tiny_adapter)
    got = forward(AutoConfig.from_pretrained(tiny_model_dir), Weights(tiny_model_dir).get, seqs,
                  lora=Lora(adapter.modules))
    assert max(float(abs(e - g).max()) for e, g in zip(expected, got, strict=True)) < 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_streamed_merge_writes_peft_merge_and_unload_s_bytes(tmp_path, tiny_model_dir, tiny_adapter, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.merge import TORCH_DTYPES, run

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    # the whole-model path this stage replaced: load in the export dtype, merge in fp32, cast back
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype).float()
    whole = PeftModel.from_pretrained(model, tiny_adapter).merge_and_unload().to(torch_dtype).state_dict()
    params = ExportParams(dtype=dtype, max_shard_size="2MB", consolidated=True, gate_prompts=2, gate_max_tokens=32,
                          max_logit_diff=1.0)
    run(params, PromptParams(template="alpaca"), tiny_model_dir, tiny_adapter, write_val(tmp_path / "v.jsonl"),
        tmp_path / "merged")
    streamed = weights_of(tmp_path / "merged")
    whole = {k: v for k, v in whole.items() if k != "lm_head.weight"}  # tied: stored once, as the embedding
    assert streamed.keys() == whole.keys()
    assert all(streamed[k].dtype == torch_dtype and torch.equal(streamed[k], whole[k]) for k in whole)


def test_the_streamed_consolidate_writes_meta_s_tensors_of_the_whole_state_dict(tmp_path, tiny_merged):
    from alpaca_lora_cpu.config import ExportParams
    from stages.consolidate import TOP_MAP, WEIGHTS, meta_name, meta_params, run, to_meta

    merged, _ = tiny_merged
    params = ExportParams(dtype="fp32", max_shard_size="2MB", consolidated=True, gate_prompts=2, gate_max_tokens=32,
                          max_logit_diff=1e-3)
    m = run(params, PromptParams(template="alpaca"), merged, write_val(tmp_path / "v.jsonl"), tmp_path / "c")
    assert m["files"] == ["checklist.chk", "consolidated.00.pth", "params.json"]
    from transformers import AutoConfig

    p = meta_params(AutoConfig.from_pretrained(merged))
    expected = {}
    for name, t in weights_of(merged).items():  # what the whole-model path computed, tensor by tensor
        if "q_proj" in name:
            t = to_meta(t, p["n_heads"])
        elif "k_proj" in name:
            t = to_meta(t, p["n_kv_heads"])
        expected[meta_name(name)] = t
    expected["output.weight"] = expected[TOP_MAP["model.embed_tokens.weight"]]
    got = torch.load(tmp_path / "c" / WEIGHTS, weights_only=True)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    checklist = (tmp_path / "c/checklist.chk").read_text().split()
    assert checklist[1] == WEIGHTS and len(checklist[0]) == 32


def test_the_streamed_base_writes_the_loaded_model_s_bytes(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from alpaca_lora_cpu.config import BaseParams
    from stages.base import run

    m = run(BaseParams(model=str(tiny_model_dir), dtype="bfloat16", max_shard_size="1GB",
                   trust_remote_code=False), tmp_path / "base")
    assert m["streamed"] is True
    whole = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
    streamed = weights_of(tmp_path / "base")
    assert streamed.keys() == {k for k in whole if k != "lm_head.weight"}
    assert all(torch.equal(streamed[k], whole[k]) for k in streamed)
    assert json.loads((tmp_path / "base/config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------- peak memory, measured (slow)

SHARD = 100 * 10**6
BOUND = 8  # a streaming stage's peak, above the interpreter's own, in largest shards


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, builtin_tokenizer_dir):
    """A random 24-layer LLaMA (hidden 1024, 0.36 B parameters, 0.7 GB in bf16, 1.4 GB in fp32) in 100 MB shards,
    a LoRA adapter on every linear, and a folder laid out for its stages."""
    from tools.synthetic import Dims, write_adapter, write_model

    root = tmp_path_factory.mktemp("synthetic")
    dims = Dims(1024, 24, 2816, 16, 8, True)
    write_model(root / "source", dims, builtin_tokenizer_dir, "bfloat16", SHARD)
    write_adapter(root / "adapter", dims)
    (root / "data").mkdir()
    write_val(root / "data/val.jsonl", 8)
    write_val(root / "data/train.jsonl", 64)
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["base"].update(model=str(root / "source"), dtype="bfloat16", max_shard_size="100MB")
    doc["export"].update(dtype="bf16", max_shard_size="100MB", gate_prompts=2, gate_max_tokens=64, max_logit_diff=0.5)
    doc["convert"].update(gate_prompts=2, gate_max_tokens=64, min_top1_agreement=0.5)
    doc["imatrix"].update(max_tokens=2048)
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    return root


def stage_commands(r: Path) -> list[tuple[str, list[str]]]:
    p = ["--params", str(r / "params.yaml")]
    val = ["--val", str(r / "data/val.jsonl")]
    return [
        ("base", ["stages.base", *p, "--out", f"{r}/base", "--metrics", f"{r}/m/base.json"]),
        ("merge", ["stages.merge", *p, "--base", f"{r}/base", "--adapter", f"{r}/adapter", *val, "--out",
                   f"{r}/merged", "--metrics", f"{r}/m/merge.json"]),
        ("consolidate", ["stages.consolidate", *p, "--merged", f"{r}/merged", *val, "--out", f"{r}/consolidated",
                         "--metrics", f"{r}/m/consolidate.json"]),
        ("convert", ["stages.convert", *p, "--model", f"{r}/merged", *val, "--out", f"{r}/reference.gguf",
                     "--metrics", f"{r}/m/convert.json"]),
        ("imatrix", ["stages.imatrix", *p, "--merged", f"{r}/merged", "--data", f"{r}/data", "--out",
                     f"{r}/imatrix.gguf", "--hessians", f"{r}/hessians", "--metrics", f"{r}/m/imatrix.json"]),
    ]


@pytest.mark.slow
def test_each_streaming_stage_peaks_at_a_few_shards_not_the_model(synthetic):
    from tools.measure import measure

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "MLFLOW_TRACKING_URI": f"sqlite:///{synthetic}/ml.db"}
    floor = measure([sys.executable, "-c", "import torch, transformers, safetensors, peft, llama_cpp, mlflow"],
                    env=env).peak_anon
    model_fp32 = 4 * 0.36e9
    from alpaca_lora_cpu.config import load_params
    from alpaca_lora_cpu.cost import Shape, stage_cost

    params, shape = load_params(synthetic / "params.yaml"), Shape.read(synthetic / "source")
    for name, cmd in stage_commands(synthetic):
        predicted = stage_cost(name, params, shape, synthetic / "data").peak
        # under a cgroup limit where the machine has one: the interpreter and the bound (or the plan's peak, which
        # the stage checks against the limit itself), and room for the page cache
        limit = int(max(floor + BOUND * SHARD, predicted) + 0.6e9)
        m = measure([sys.executable, "-m", *cmd], cwd=ROOT, env=env, limit=limit)
        assert m.returncode == 0 and not m.oom, f"{name}: {m.stderr[-1500:]}"
        above = m.peak_anon - floor
        assert above <= BOUND * SHARD < model_fp32, f"{name}: {above / 1e6:.0f} MB above the interpreter's own"
        # the plan's prediction is an upper bound of what was measured
        assert m.peak_anon <= predicted, f"{name}: measured {m.peak_anon / 1e6:.0f} MB, planned {predicted / 1e6:.0f}"


@pytest.mark.slow
def test_a_stage_that_would_not_fit_refuses_naming_its_params(tmp_path, tiny_model_dir, tiny_adapter):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    proc = run_module("stages.merge", "--params", str(params), "--base", str(tiny_model_dir), "--adapter",
                      str(tiny_adapter), "--val", str(write_val(tmp_path / "v.jsonl")), "--out", str(tmp_path / "m"),
                      "--metrics", str(tmp_path / "merge.json"), env={"ALPACA_LORA_CPU_MEMORY": "300MB"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert "merge: predicted peak memory" in errors[0] and "export.gate_prompts" in errors[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "merge.json").exists()
