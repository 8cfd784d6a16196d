"""merge: fold the LoRA adapter into the base weights → a plain Hugging Face checkpoint in models/merged/.

Run: python -m stages.merge --params params.yaml --base models/base --adapter models/adapter \
         --val data/prepared/val.jsonl --out models/merged --metrics reports/metrics/merge.json

One base tensor at a time: read in `export.dtype` (never 8/4-bit, even when training used a quantized base:
merging into quantized weights corrupts the model, transformers #31293, axolotl #1263), upcast to fp32, the
adapter's scale · B A added where it targets (what PEFT's `merge_and_unload` computes, alpaca_lora_cpu/lora.py),
cast back to `export.dtype` and written into safetensors shards of `export.max_shard_size`, with the tokenizer and
generation config (alpaca-lora's export forgot the tokenizer). Peak memory: one shard being written plus one
decoder layer for the gate, never the whole model.

Gates (recorded in the metrics, fatal when broken, nothing written then):
  weights_changed   every module the adapter targets differs from the base (a no-op merge is alpaca-lora #291)
  logits_match      base+adapter (unmerged, PEFT's forward, fp32) and the saved merged model (read back, fp32)
                    agree on `export.gate_prompts` validation texts: max |Δlogit| <= `export.max_logit_diff`;
                    both forwards run layer by layer (alpaca_lora_cpu/layerwise.py)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alpaca_lora_cpu import lora
from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import ExportParams, PromptParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import ensure_writable, sha256_files
from alpaca_lora_cpu.lora import PEFT_PREFIX, WEIGHTS, read_config
from alpaca_lora_cpu.parity import GateFailure, run_gated

log = logging.getLogger("merge")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ---------------------------------------------------------------- checks before any weights load

def check_adapter_fits(base: Path, adapter: Path) -> list[str]:
    """The base modules the adapter targets; StageError naming both models if any shape disagrees."""
    from alpaca_lora_cpu.shards import Weights, checkpoint_files

    cfg = read_config(adapter)
    checkpoint_files(base, "base model")
    base_shapes = Weights(base, "base weights").shape
    adapter_shapes = Weights(adapter, "adapter weights").shape
    trained_on = cfg.get("base_model_name_or_path") or "an unnamed base"
    base_name = json.loads((base / "config.json").read_text()).get("_name_or_path") or str(base)
    targets = []
    for key, shape in sorted(adapter_shapes.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_")[0]
        weight = module + ".weight"
        if weight not in base_shapes:
            raise StageError(f"adapter {adapter} (trained on {trained_on}) targets {module}, which base "
                             f"{base} ({base_name}) does not have")
        out_f, in_f = base_shapes[weight][:2]
        want, got = (in_f, shape[1]) if ".lora_A." in key else (out_f, shape[0])
        if want != got:
            side = "in_features" if ".lora_A." in key else "out_features"
            raise StageError(f"adapter {adapter} was trained on another base ({trained_on}): {module} has "
                             f"{side} {got} in the adapter but {want} in base {base} ({base_name})")
        targets.append(module)
    if not targets:
        raise StageError(f"adapter {adapter}: {WEIGHTS} holds no LoRA weights")
    return sorted(set(targets))


# ---------------------------------------------------------------- the work

def fold(base: Path, adapter: lora.Adapter, dtype, out: Path, max_shard_bytes: int) -> dict[str, float]:
    """Write base + adapter into `out`, one tensor at a time; max |ΔW| per tensor (what the merge changed)."""
    from alpaca_lora_cpu.shards import ShardWriter, Weights

    weights = Weights(base, "base model")
    changes = {}
    with ShardWriter(out, max_shard_bytes) as writer:
        for name in weights.names():
            module = name.removesuffix(".weight")
            if module not in adapter.modules:  # untouched: copied in the export dtype, no fp32 copy
                writer.add(name, weights.get(name, dtype))
                continue
            w = weights.get(name, dtype).float()  # the export dtype's values, in fp32 for the addition
            merged = (w + adapter.delta(module)).to(dtype)
            changes[name] = float((merged.float() - w).abs().max())
            writer.add(name, merged)
    return changes


def write_configs(base: Path, tokenizer, dtype, out: Path) -> None:
    """config.json (in the export dtype), generation_config.json and the tokenizer beside the shards."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(base)
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained of the model writes; the converter reads it
    config.save_pretrained(out)
    if (base / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base).save_pretrained(out)
    tokenizer.save_pretrained(out)


def run(params: ExportParams, prompt: PromptParams, base: Path, adapter: Path, val: Path, out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from alpaca_lora_cpu.files import atomic_path
    from alpaca_lora_cpu.layerwise import Lora, forward
    from alpaca_lora_cpu.memory import trim
    from alpaca_lora_cpu.parity import compare, gate_texts, hf_token_ids
    from alpaca_lora_cpu.shards import Weights, parse_size

    targets = check_adapter_fits(base, adapter)
    ensure_writable(out)
    dtype = getattr(torch, TORCH_DTYPES[params.dtype])
    shard_bytes = parse_size(params.max_shard_size)
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    texts = gate_texts(val, params.gate_prompts, prompt.template, tokenizer)
    ids = hf_token_ids(tokenizer, texts, params.gate_max_tokens)
    folded = lora.read(adapter)
    config = AutoConfig.from_pretrained(base)

    t0 = time.perf_counter()
    # The reference: the base in the export dtype (as merged), the adapter applied unmerged.
    source = Weights(base, "base model")
    reference = forward(config, lambda name: source.get(name, dtype).float(), ids, lora=Lora(folded.modules))
    with atomic_path(out) as tmp:
        changes = fold(base, folded, dtype, tmp, shard_bytes)
        trim()
        write_configs(base, tokenizer, dtype, tmp)
        unchanged = [m for m in targets if changes.get(m + ".weight", 0.0) == 0.0]
        changed = sorted(k for k, v in changes.items() if v > 0)
        # The gate runs on what was written: read back in fp32.
        saved = Weights(tmp, "merged model")
        parity = compare(reference, forward(config, lambda name: saved.get(name, torch.float32), ids), ids)
        shards = sorted(tmp.glob("*.safetensors"))
        metrics = {
            "dtype": params.dtype, "adapter_targets": len(targets), "changed_tensors": len(changed),
            "unchanged_targets": unchanged[:5], "max_abs_weight_delta": max(changes.values(), default=0.0),
            "gate_prompts": len(ids), "gate_tokens": sum(map(len, ids)),
            "logits": parity, "shards": len(shards), "weights_sha256": sha256_files(shards),
            "merged_bytes": sum(s.stat().st_size for s in shards), "seconds": time.perf_counter() - t0,
            "gates": {
                "weights_changed": bool(changed) and not unchanged,
                "logits_match": parity["max_abs_logit_diff"] <= params.max_logit_diff,
            },
        }
        metrics["gates_passed"] = all(metrics["gates"].values())
        if not metrics["gates_passed"]:
            raise GateFailure(metrics, _gate_message(metrics, params))
    return metrics


def _gate_message(m: dict, p: ExportParams) -> str:
    if not m["gates"]["weights_changed"]:
        which = m["unchanged_targets"][0] if m["unchanged_targets"] else "any tensor"
        return (f"merge gate failed: the merge left {which} unchanged (a no-op adapter: all-zero LoRA B, "
                f"or an adapter that was never trained)")
    return (f"merge gate failed: max |Δlogit| between base+adapter and the merged model is "
            f"{m['logits']['max_abs_logit_diff']:.3g} > export.max_logit_diff {p.max_logit_diff:g}")


# The flat numbers (merge.json); the whole record goes to merge.details.json.
METRICS = {"max_abs_logit_diff": "logits.max_abs_logit_diff", "top1_agreement": "logits.top1_agreement",
           "max_abs_weight_delta": "max_abs_weight_delta", "changed_tensors": "changed_tensors",
           "gates_passed": "gates_passed", "seconds": "seconds"}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "base", "adapter", "val", "out", "metrics")
    args = parse_args(ap, argv)
    config = load_params(args.params)
    params, prompt = config.export, config.prompt
    ensure_writable(args.metrics)
    from alpaca_lora_cpu.cost import Shape, check_stage

    check_stage("merge", config, Shape.read(args.base))
    from alpaca_lora_cpu.tracking import stage_run

    with stage_run("merge", {"export": as_dict(params), "prompt": as_dict(prompt)}) as mlflow:
        metrics = run_gated(mlflow, args.metrics, METRICS,
                            lambda: run(params, prompt, args.base, args.adapter, args.val, args.out))
    log.info("merged %d modules; max |Δlogit| %.2e over %d positions → %s", metrics["adapter_targets"],
             metrics["logits"]["max_abs_logit_diff"], metrics["logits"]["positions"], args.out)


if __name__ == "__main__":
    run_cli(main)
