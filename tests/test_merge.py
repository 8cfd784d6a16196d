"""merge: gates pass on a real adapter, fail on a no-op one; bad adapters and outputs are one-line errors."""
from __future__ import annotations

import shutil

import pytest
from helpers import make_adapter, run_module, write_val

from alpaca_lora_cpu.config import ExportParams, PromptParams
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.parity import GateFailure
from stages.merge import check_adapter_fits, run

PARAMS = ExportParams(dtype="fp32", max_shard_size="2MB", consolidated=True, gate_prompts=3, gate_max_tokens=64,
                      max_logit_diff=1e-3)
PROMPT = PromptParams(template="alpaca")


def test_merge_gates_pass_and_output_is_complete(tiny_merged):
    merged, m = tiny_merged
    assert m["gates_passed"] and m["gates"] == {"weights_changed": True, "logits_match": True}
    assert m["adapter_targets"] == 8 and m["changed_tensors"] == 8  # 2 layers × q/k/v/o
    assert 0 <= m["logits"]["max_abs_logit_diff"] <= 1e-3 and m["logits"]["positions"] > 50
    assert m["max_abs_weight_delta"] > 0
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= names
    assert m["shards"] >= 2 and "model.safetensors.index.json" in names  # max_shard_size honoured


def test_noop_adapter_is_caught_and_nothing_written(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "noop", trained=False)  # LoRA B = 0
    with pytest.raises(GateFailure, match="no-op adapter") as exc:
        run(PARAMS, PROMPT, tiny_model_dir, adapter, write_val(tmp_path / "val.jsonl"), tmp_path / "merged")
    assert exc.value.metrics["gates"]["weights_changed"] is False
    assert not (tmp_path / "merged").exists()


def test_logit_gate_fails_when_tolerance_is_impossible(tmp_path, tiny_model_dir, tiny_adapter):
    # bf16 storage rounds the merged weights: the fp32 gate at 1e-9 must catch the difference.
    strict = ExportParams("bf16", "2MB", True, 2, 32, 1e-9)
    with pytest.raises(GateFailure, match="max \\|Δlogit\\|"):
        run(strict, PROMPT, tiny_model_dir, tiny_adapter, write_val(tmp_path / "val.jsonl"), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_and_corrupt_adapter(tmp_path, tiny_model_dir, tiny_adapter):
    with pytest.raises(StageError, match="not found"):
        check_adapter_fits(tiny_model_dir, tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapter, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(StageError, match="adapter_model.safetensors is damaged or not a safetensors file"):
        check_adapter_fits(tiny_model_dir, bad)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(StageError, match="not valid JSON"):
        check_adapter_fits(tiny_model_dir, bad)


def test_adapter_from_another_base_names_both(tmp_path, tiny_model_dir, builtin_tokenizer_dir):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = tmp_path / "other-base"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(other)
    adapter = make_adapter(other, tmp_path / "adapter")
    with pytest.raises(StageError, match="trained on another base") as exc:
        check_adapter_fits(tiny_model_dir, adapter)
    assert str(other) in str(exc.value) and str(tiny_model_dir) in str(exc.value)


def test_unwritable_output_folder(tmp_path, tiny_model_dir, tiny_adapter):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(StageError, match="cannot create output folder"):
        run(PARAMS, PROMPT, tiny_model_dir, tiny_adapter, write_val(tmp_path / "v.jsonl"), blocker / "merged")


@pytest.mark.slow
def test_cli_bad_adapter_is_one_line(tmp_path, tiny_model_dir):
    proc = run_module("stages.merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "none"),
                      "--val", str(write_val(tmp_path / "v.jsonl")), "--out", str(tmp_path / "merged"),
                      "--metrics", str(tmp_path / "m.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: adapter folder")
    assert not (tmp_path / "merged").exists()


def test_params_yaml_export_sections_load():
    import yaml
    from helpers import ROOT

    from alpaca_lora_cpu.config import load_params
    from alpaca_lora_cpu.quantizer import SEARCHED, plan_for, valid_types

    params = ROOT / "params.yaml"
    loaded = load_params(params)
    assert loaded.export.dtype in ("fp32", "bf16", "fp16")
    assert loaded.convert.min_top1_agreement == 0.99
    assert loaded.generate.n_ctx >= 64
    types = yaml.safe_load(params.read_text())["quantize"]["types"]
    # every entry is a llama.cpp level (maybe -imat), a recipe, or `searched` (maybe -gptq), each resolving to a
    # valid level
    plans = [plan_for(t, loaded.quantize.recipes) for t in types if not t.startswith(SEARCHED)]
    assert plans and {p.qtype for p in plans} <= set(valid_types())
    with pytest.raises(ValueError, match="export.gate_prompts"):
        ExportParams("fp32", "1GB", True, 0, 64, 1e-3)
