"""merge: fold the LoRA adapter into the base weights → a plain Hugging Face checkpoint in models/merged/.

Run: python -m stages.merge --params params.yaml --base models/base --adapter models/adapter \
         --val data/prepared/val.jsonl --out models/merged --metrics reports/metrics/merge.json

The base is loaded in `export.dtype` (never 8/4-bit, even when training used a quantized base: merging into
quantized weights corrupts the model, transformers #31293, axolotl #1263), upcast to fp32 for the merge, merged
with PEFT's `merge_and_unload`, cast back to `export.dtype` and saved as sharded safetensors
(`export.max_shard_size`) with the tokenizer and generation config (alpaca-lora's export forgot the tokenizer).

Gates (recorded in the metrics, fatal when broken, nothing written then):
  weights_changed   every module the adapter targets differs from the base (a no-op merge is alpaca-lora #291)
  logits_match      base+adapter (unmerged, fp32) and the saved merged model (reloaded, fp32) agree on
                    `export.gate_prompts` validation texts: max |Δlogit| <= `export.max_logit_diff`
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import ExportParams, PromptParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import ensure_writable, sha256_files
from alpaca_lora_cpu.parity import GateFailure, run_gated

log = logging.getLogger("merge")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------- checks before any weights load

def safetensors_shapes(files: list[Path], what: str) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from safetensors headers only (cheap, and catches corrupt files early)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    shapes[k] = tuple(fh.get_slice(k).get_shape())
        except Exception as exc:  # safetensors raises its own SafetensorError for damaged headers
            raise StageError(f"{what} {f} is corrupt or not safetensors ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]})") from exc
    return shapes


def model_files(folder: Path, what: str) -> list[Path]:
    if not (folder / "config.json").is_file():
        raise StageError(f"{what} {folder}: no config.json (not a Hugging Face model folder)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise StageError(f"{what} {folder}: no *.safetensors weights")
    return files


def read_adapter_config(adapter: Path) -> dict:
    cfg_path = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise StageError(f"adapter folder {adapter} not found (run the finetune stage first)")
    if not cfg_path.is_file():
        raise StageError(f"adapter {adapter}: adapter_config.json missing (not a PEFT adapter folder)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StageError(f"adapter {cfg_path} is corrupt: not valid JSON") from exc
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise StageError(f"adapter {cfg_path}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise StageError(f"adapter {adapter}: {ADAPTER_WEIGHTS} missing")
    return cfg


def check_adapter_fits(base: Path, adapter: Path) -> list[str]:
    """The base modules the adapter targets; StageError naming both models if any shape disagrees."""
    cfg = read_adapter_config(adapter)
    base_shapes = safetensors_shapes(model_files(base, "base model"), "base weights")
    lora = safetensors_shapes([adapter / ADAPTER_WEIGHTS], "adapter weights")
    trained_on = cfg.get("base_model_name_or_path") or "an unnamed base"
    base_name = json.loads((base / "config.json").read_text()).get("_name_or_path") or str(base)
    targets = []
    for key, shape in sorted(lora.items()):
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
        raise StageError(f"adapter {adapter}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return sorted(set(targets))


# ---------------------------------------------------------------- the work

def weight_changes(base_sd: dict, merged_sd: dict) -> dict[str, float]:
    """Max |ΔW| per tensor present in both."""
    return {k: float((merged_sd[k].float() - v.float()).abs().max()) for k, v in base_sd.items() if k in merged_sd}


def run(params: ExportParams, prompt: PromptParams, base: Path, adapter: Path, val: Path, out: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_lora_cpu.files import atomic_path
    from alpaca_lora_cpu.parity import compare, gate_texts, hf_logits, hf_token_ids

    targets = check_adapter_fits(base, adapter)
    ensure_writable(out)
    dtype = getattr(torch, TORCH_DTYPES[params.dtype])
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    texts = gate_texts(val, params.gate_prompts, prompt.template, tokenizer)
    ids = hf_token_ids(tokenizer, texts, params.gate_max_tokens)

    t0 = time.perf_counter()
    # Load in the export dtype, then merge in fp32 so the only rounding is the final cast.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).float()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    reference = hf_logits(peft_model, ids)
    merged = peft_model.merge_and_unload().to(dtype)
    changes = weight_changes(base_sd, merged.state_dict())
    del base_sd
    unchanged = [m for m in targets if changes.get(m + ".weight", 0.0) == 0.0]
    changed = sorted(k for k, v in changes.items() if v > 0)

    metrics = {
        "dtype": params.dtype, "adapter_targets": len(targets), "changed_tensors": len(changed),
        "unchanged_targets": unchanged[:5], "max_abs_weight_delta": max(changes.values(), default=0.0),
        "gate_prompts": len(ids), "gate_tokens": sum(map(len, ids)),
    }
    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=params.max_shard_size)
        tokenizer.save_pretrained(tmp)
        # The gate runs on what was written: reload the saved files in fp32.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        parity = compare(reference, hf_logits(reloaded, ids), ids)
        shards = sorted(tmp.glob("*.safetensors"))
        metrics.update({
            "logits": parity, "shards": len(shards), "weights_sha256": sha256_files(shards),
            "merged_bytes": sum(s.stat().st_size for s in shards), "seconds": time.perf_counter() - t0,
            "gates": {
                "weights_changed": bool(changed) and not unchanged,
                "logits_match": parity["max_abs_logit_diff"] <= params.max_logit_diff,
            },
        })
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
    from alpaca_lora_cpu.tracking import stage_run

    with stage_run("merge", {"export": as_dict(params), "prompt": as_dict(prompt)}) as mlflow:
        metrics = run_gated(mlflow, args.metrics, METRICS,
                            lambda: run(params, prompt, args.base, args.adapter, args.val, args.out))
    log.info("merged %d modules; max |Δlogit| %.2e over %d positions → %s", metrics["adapter_targets"],
             metrics["logits"]["max_abs_logit_diff"], metrics["logits"]["positions"], args.out)


if __name__ == "__main__":
    run_cli(main)
