"""consolidate: models/merged/ → Meta/PyTorch consolidated weights (the tutorial's step 4), round-trip checked.

Run: python -m stages.consolidate --params params.yaml --merged models/merged --val data/prepared/val.jsonl \
         --out models/consolidated --metrics reports/metrics/consolidate.json

Writes `consolidated.00.pth` (tensors only: loads with `torch.load(weights_only=True)`) and `params.json` with the
real dimensions (never vocab_size -1, which broke llama.cpp #3900). Meta's layout differs from Hugging Face's in
the q/k projections: HF's conversion script permutes their rows so rotary embeddings can rotate halves instead of
interleaved pairs; `to_meta` undoes it per head group — n_heads for wq, n_kv_heads for wk (alpaca-lora's export
assumed square wk, wrong for grouped-query attention such as SmolLM2's 9 query / 3 KV heads).

Gate (fatal): rebuild a Hugging Face model from the consolidated files with HF's own forward permutation and
compare its logits with models/merged/ (max |Δlogit| <= export.max_logit_diff).

llama.cpp converts straight from the HF checkpoint (the `convert` stage), so this output is for tools that want
Meta's format. With `export.consolidated: false` the stage writes only a SKIPPED marker and skipped metrics.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import ExportParams, PromptParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, ensure_writable
from alpaca_lora_cpu.parity import GateFailure, run_gated

log = logging.getLogger("consolidate")
WEIGHTS = "consolidated.00.pth"
SKIP_MARKER = "SKIPPED"

# HF name (after "model.layers.{i}.") → Meta name (after "layers.{i}.")
LAYER_MAP = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_MAP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}


def to_meta(w: Any, n_heads: int) -> Any:
    """Inverse of HF's rotary permutation: per head, rows (halves) → (interleaved pairs). `n_heads` is the
    number of heads *this* matrix holds (n_kv_heads for wk)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf(w: Any, n_heads: int) -> Any:
    """HF's permutation, as in transformers' convert_llama_weights_to_hf.py: (interleaved pairs) → (halves)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_params(cfg: Any) -> dict:
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", None)
    params = {
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope, "hidden_dim": cfg.intermediate_size, "max_seq_len": cfg.max_position_embeddings,
    }
    bad = [k for k, v in params.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0]
    if bad:
        raise StageError(f"config of the merged model: {bad[0]} is {params[bad[0]]!r} (must be a positive number)")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if (getattr(cfg, "head_dim", None) or head_dim) != head_dim:
        raise StageError("config of the merged model: head_dim != dim / n_heads is not expressible in params.json")
    return params


def to_meta_state_dict(sd: dict, p: dict, permute: Callable[[Any, int], Any] = to_meta) -> dict:
    out = {}
    for name, t in sd.items():
        if name in TOP_MAP:
            out[TOP_MAP[name]] = t
            continue
        if not name.startswith("model.layers."):
            raise StageError(f"merged model: unexpected tensor {name} (not a plain LLaMA checkpoint)")
        _, _, i, rest = name.split(".", 3)
        meta = f"layers.{i}.{LAYER_MAP[rest]}"
        if rest.startswith("self_attn.q_proj"):
            t = permute(t, p["n_heads"])
        elif rest.startswith("self_attn.k_proj"):
            t = permute(t, p["n_kv_heads"])
        out[meta] = t.contiguous().clone()
    if "output.weight" not in out:  # tied embeddings: Meta's format always has its own output matrix
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def rebuild_hf(folder: Path, template_config: Any) -> Any:
    """An HF LlamaForCausalLM from consolidated.00.pth + params.json (fp32), the way HF's converter does it."""
    import torch
    from transformers import LlamaForCausalLM

    p = json.loads((folder / "params.json").read_text())
    sd = torch.load(folder / WEIGHTS, weights_only=True, map_location="cpu")
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["output.weight"]}
    back = {v: k for k, v in LAYER_MAP.items()}
    for i in range(p["n_layers"]):
        for meta, name in back.items():
            t = sd[f"layers.{i}.{meta}"]
            if meta == "attention.wq.weight":
                t = to_hf(t, p["n_heads"])
            elif meta == "attention.wk.weight":
                t = to_hf(t, p["n_kv_heads"])
            hf[f"model.layers.{i}.{name}"] = t
    config = template_config.__class__.from_dict(template_config.to_dict())
    config.hidden_size, config.num_hidden_layers = p["dim"], p["n_layers"]
    config.num_attention_heads, config.num_key_value_heads = p["n_heads"], p["n_kv_heads"]
    config.vocab_size, config.rms_norm_eps, config.intermediate_size = p["vocab_size"], p["norm_eps"], p["hidden_dim"]
    model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=False)
    return model.float().eval()


def run(params: ExportParams, prompt: PromptParams, merged: Path, val: Path, out: Path,
        permute: Callable[[Any, int], Any] = to_meta) -> dict:
    if not params.consolidated:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / SKIP_MARKER).write_text("export.consolidated is false: no Meta consolidated weights written.\n")
        return {"skipped": True, "reason": "export.consolidated is false"}

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_lora_cpu.parity import compare, gate_texts, hf_logits, hf_token_ids

    if not (merged / "config.json").is_file():
        raise StageError(f"merged model {merged}: no config.json (run the merge stage first)")
    ensure_writable(out)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = hf_token_ids(tokenizer, gate_texts(val, params.gate_prompts, prompt.template, tokenizer),
                       params.gate_max_tokens)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    if model.config.model_type != "llama":
        raise StageError(f"merged model {merged}: model_type {model.config.model_type!r}, expected 'llama'")
    p = meta_params(model.config)
    saved_dtype = json.loads((merged / "config.json").read_text()).get("dtype", "float32")
    sd = {k: v.to(getattr(torch, saved_dtype)) for k, v in model.state_dict().items()}
    reference = hf_logits(model, ids)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        torch.save(to_meta_state_dict(sd, p, permute), tmp / WEIGHTS)
        (tmp / "params.json").write_text(json.dumps(p, indent=2) + "\n")
        parity = compare(reference, hf_logits(rebuild_hf(tmp, model.config), ids), ids)
        metrics = {
            "skipped": False, "params": p, "dtype": saved_dtype, "weights_bytes": (tmp / WEIGHTS).stat().st_size,
            "tensors": len(sd) + (1 if "lm_head.weight" not in sd else 0), "roundtrip": parity,
            "gates": {"roundtrip_logits_match": parity["max_abs_logit_diff"] <= params.max_logit_diff},
        }
        metrics["gates_passed"] = all(metrics["gates"].values())
        if not metrics["gates_passed"]:
            raise GateFailure(metrics, f"consolidate gate failed: the model rebuilt from {WEIGHTS} differs from "
                              f"{merged} (max |Δlogit| {parity['max_abs_logit_diff']:.3g} > "
                              f"export.max_logit_diff {params.max_logit_diff:g}): wrong q/k permutation?")
    return metrics


# The flat numbers (consolidate.json); the whole record goes to consolidate.details.json. A skipped run has
# only `skipped`.
METRICS = {"skipped": "skipped", "max_abs_logit_diff": "roundtrip.max_abs_logit_diff",
           "top1_agreement": "roundtrip.top1_agreement", "tensors": "tensors", "gates_passed": "gates_passed"}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "merged", "val", "out", "metrics")
    args = parse_args(ap, argv)
    config = load_params(args.params)
    params, prompt = config.export, config.prompt
    ensure_writable(args.metrics)
    from alpaca_lora_cpu.tracking import stage_run

    with stage_run("consolidate", {"export": as_dict(params), "prompt": as_dict(prompt)}) as mlflow:
        metrics = run_gated(mlflow, args.metrics, METRICS, lambda: run(params, prompt, args.merged, args.val, args.out))
    log.info("consolidate: %s", "skipped" if metrics["skipped"] else
             f"round-trip max |Δlogit| {metrics['roundtrip']['max_abs_logit_diff']:.2e} → {args.out}")


if __name__ == "__main__":
    run_cli(main)
