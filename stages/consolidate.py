"""consolidate: models/merged/ → Meta/PyTorch consolidated weights (the tutorial's step 4), round-trip checked.

Run: python -m stages.consolidate --params params.yaml --merged models/merged --val data/prepared/val.jsonl \
         --out models/consolidated --metrics reports/metrics/consolidate.json

Writes Meta's layout: `consolidated.00.pth` (tensors only: loads with `torch.load(weights_only=True)`),
`params.json` with the real dimensions (never vocab_size -1, which broke llama.cpp #3900), `checklist.chk` (the
md5 of each file, as Meta ships it) and `tokenizer.model` when the model has a SentencePiece one. Meta's
layout differs from Hugging Face's in the q/k projections: HF's conversion script permutes their rows so rotary
embeddings can rotate halves instead of interleaved pairs; `to_meta` undoes it per head group — n_heads for wq,
n_kv_heads for wk (alpaca-lora's export assumed square wk, wrong for grouped-query attention such as SmolLM2's
9 query / 3 KV heads).

The weights stream: every tensor that needs no change is a memory map of the merged shards, the permuted q/k
projections (and the output matrix of a tied model) are written to a scratch file and mapped too, so torch.save
reads the model from the page cache instead of holding it.

Gate (fatal): read the consolidated file back (memory-mapped), undo the permutation with HF's own converter's
forward one, and compare its logits with models/merged/ (max |Δlogit| <= export.max_logit_diff); both forwards
run layer by layer (alpaca_lora_cpu/layerwise.py).

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


def meta_name(name: str) -> str:
    """The Meta name of an HF LLaMA tensor (`model.layers.3.mlp.up_proj.weight` → `layers.3.feed_forward.w3.weight`)."""
    if name in TOP_MAP:
        return TOP_MAP[name]
    parts = name.split(".", 3)
    if not name.startswith("model.layers.") or len(parts) < 4 or parts[3] not in LAYER_MAP:
        raise StageError(f"merged model: unexpected tensor {name} (not a plain LLaMA checkpoint)")
    return f"layers.{parts[2]}.{LAYER_MAP[parts[3]]}"


def meta_tensors(weights: Any, p: dict, scratch: Path, permute: Callable[[Any, int], Any] = to_meta) -> dict:
    """Meta name → tensor, each a memory map: the merged shards' own bytes, or for the permuted q/k (and the output
    matrix of a tied model) bytes written once to `scratch`."""
    import numpy as np
    import torch

    views, pending = {}, []
    for name in weights.names():
        meta, t = meta_name(name), weights.view(name)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            pending.append((meta, permute(t, p["n_heads" if "q_proj" in name else "n_kv_heads"])))
        else:
            views[meta] = t
    if "output.weight" not in views:  # tied embeddings: Meta's format always has its own output matrix
        pending.append(("output.weight", views["tok_embeddings.weight"]))
    placed = []
    with open(scratch, "wb") as fh:
        for meta, t in pending:
            placed.append((meta, fh.tell(), t.dtype, tuple(t.shape)))
            fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    if placed:
        mm = np.memmap(scratch, dtype=np.uint8, mode="c")
        for meta, offset, dtype, shape in placed:
            nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            views[meta] = torch.from_numpy(mm[offset:offset + nbytes]).view(dtype).reshape(shape)
    return views


class MetaWeights:
    """HF LLaMA tensor names read from a consolidated file (memory-mapped), with HF's permutation of q/k."""

    def __init__(self, folder: Path) -> None:
        import torch

        self.p = json.loads((folder / "params.json").read_text())
        self.sd = torch.load(folder / WEIGHTS, weights_only=True, map_location="cpu", mmap=True)

    def get(self, name: str) -> Any:
        t = self.sd["output.weight" if name == "lm_head.weight" else meta_name(name)]
        if name.endswith("self_attn.q_proj.weight"):
            t = to_hf(t, self.p["n_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            t = to_hf(t, self.p["n_kv_heads"])
        return t.float()


def config_from_params(template_config: Any, p: dict) -> Any:
    """The HF config of a model rebuilt from params.json: Meta's dimensions, and its own output matrix."""
    config = template_config.__class__.from_dict(template_config.to_dict())
    config.hidden_size, config.num_hidden_layers = p["dim"], p["n_layers"]
    config.num_attention_heads, config.num_key_value_heads = p["n_heads"], p["n_kv_heads"]
    config.vocab_size, config.rms_norm_eps, config.intermediate_size = p["vocab_size"], p["norm_eps"], p["hidden_dim"]
    config.tie_word_embeddings = False
    return config


def checklist(folder: Path, names: list[str]) -> str:
    """Meta's checklist.chk: `<md5>  <file>` per file."""
    import hashlib

    lines = []
    for name in names:
        digest = hashlib.md5()
        with open(folder / name, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {name}")
    return "\n".join(lines) + "\n"


def write_meta(weights: Any, p: dict, merged: Path, tmp: Path, permute: Callable[[Any, int], Any]) -> list[str]:
    """consolidated.00.pth, params.json, tokenizer.model (when there is one) and checklist.chk into `tmp`."""
    import shutil

    import torch

    scratch = tmp / ".scratch"
    torch.save(meta_tensors(weights, p, scratch, permute), tmp / WEIGHTS)
    scratch.unlink(missing_ok=True)
    (tmp / "params.json").write_text(json.dumps(p, indent=2) + "\n")
    files = [WEIGHTS, "params.json"]
    if (merged / "tokenizer.model").is_file():  # SentencePiece, as Meta ships it beside the weights
        shutil.copy(merged / "tokenizer.model", tmp / "tokenizer.model")
        files.append("tokenizer.model")
    (tmp / "checklist.chk").write_text(checklist(tmp, files))
    return [*files, "checklist.chk"]


def run(params: ExportParams, prompt: PromptParams, merged: Path, val: Path, out: Path,
        permute: Callable[[Any, int], Any] = to_meta) -> dict:
    if not params.consolidated:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / SKIP_MARKER).write_text("export.consolidated is false: no Meta consolidated weights written.\n")
        return {"skipped": True, "reason": "export.consolidated is false"}

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from alpaca_lora_cpu.layerwise import forward
    from alpaca_lora_cpu.parity import compare, gate_texts, hf_token_ids
    from alpaca_lora_cpu.shards import Weights, checkpoint_files

    checkpoint_files(merged, "merged model")
    ensure_writable(out)
    config = AutoConfig.from_pretrained(merged)
    if config.model_type != "llama":
        raise StageError(f"merged model {merged}: model_type {config.model_type!r}, expected 'llama'")
    p = meta_params(config)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = hf_token_ids(tokenizer, gate_texts(val, params.gate_prompts, prompt.template, tokenizer),
                       params.gate_max_tokens)
    weights = Weights(merged, "merged model")
    saved_dtype = json.loads((merged / "config.json").read_text()).get("dtype", "float32")
    reference = forward(config, lambda name: weights.get(name, torch.float32), ids)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        files = write_meta(weights, p, merged, tmp, permute)
        parity = compare(reference, forward(config_from_params(config, p), MetaWeights(tmp).get, ids), ids)
        metrics = {
            "skipped": False, "params": p, "dtype": saved_dtype, "weights_bytes": (tmp / WEIGHTS).stat().st_size,
            "tensors": len(weights.names()) + (1 if "lm_head.weight" not in weights else 0), "roundtrip": parity,
            "files": sorted(files),
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
    from alpaca_lora_cpu.cost import Shape, check_stage

    check_stage("consolidate", config, Shape.read(args.merged))
    from alpaca_lora_cpu.tracking import stage_run

    with stage_run("consolidate", {"export": as_dict(params), "prompt": as_dict(prompt)}) as mlflow:
        metrics = run_gated(mlflow, args.metrics, METRICS, lambda: run(params, prompt, args.merged, args.val, args.out))
    log.info("consolidate: %s", "skipped" if metrics["skipped"] else
             f"round-trip max |Δlogit| {metrics['roundtrip']['max_abs_logit_diff']:.2e} → {args.out}")


if __name__ == "__main__":
    run_cli(main)
