"""quantize: the reference GGUF → one llama.cpp quantization level, with an Ollama Modelfile beside it.

Run (dvc.yaml runs one `quantize@<type>` per entry of `quantize.types`, each cached on its own):
    python -m stages.quantize --params params.yaml --type q4_k_m --src models/gguf/finetuned-reference.gguf \
        --imatrix models/imatrix/imatrix.gguf --searched models/search/recipe.json \
        --out models/gguf/finetuned-q4_k_m.gguf --modelfile models/gguf/finetuned-q4_k_m.Modelfile \
        --metrics reports/metrics/quantize/q4_k_m.json

Quantizes with llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`, default params, the ftype named by
`--type`), then reads the result back with the `gguf` package: file size, bits per weight, seconds, the stored
type of every tensor and — for each tensor stored in another type than the one asked — why: 1-D norms stay
F32; k-quants need rows divisible by 256 (SmolLM2's 576-wide rows are not, so llama.cpp falls back, as its own
log says); the k-quant mixes (_M/_S/_L) deliberately give some tensors more bits.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import PromptParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, ensure_writable, write_text
from alpaca_lora_cpu.prompts import render, stop_sequences
from alpaca_lora_cpu.quantizer import (
    Plan,
    asked_type,
    imatrix_entries,
    plan_for,
    quantize_file,
    read_recipe,
    recipe_type,
)
from alpaca_lora_cpu.variants import SEARCHED

log = logging.getLogger("quantize")
FALLBACK = re.compile(r"^\S*warning:\s*(\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\S+)\)"
                      r"\s*-> falling back to\s+(\S+)")
def other_types(infos: list, plan: Plan, log_lines: list[str]) -> dict:
    """Tensors stored in another type than the plan's level asks, grouped by reason (count, stored types,
    examples)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = plan.qtype
    asked = asked_type(qtype)
    block = GGML_QUANT_SIZES[GGMLQuantizationType[asked]][0]
    fell_back = {m[1]: m for m in (FALLBACK.match(ln) for ln in log_lines) if m}
    groups: dict[str, dict] = defaultdict(lambda: {"count": 0, "stored": defaultdict(int), "examples": []})
    for t in infos:
        if t.type == asked:
            continue
        if len(t.shape) == 1 or t.shape[1] == 1:
            reason = "1-D tensor (norm weights): llama.cpp keeps these in F32"
        elif recipe_type(plan, t.name) == t.type:
            reason = f"the recipe {plan.name!r} sets this tensor's type"
        elif t.name in fell_back:
            m = fell_back[t.name]
            reason = (f"rows of {m[2]} not divisible by {m[3]} (the block size of {m[4]}): llama.cpp fell back "
                      f"from {m[4]} to {m[5]}")
        elif t.shape[0] % block:
            reason = f"rows of {t.shape[0]} not divisible by {block} (the block size of {asked}): llama.cpp fell back"
        else:
            reason = f"llama.cpp's {qtype} recipe gives this tensor another type (more bits for sensitive tensors)"
        g = groups[reason]
        g["count"] += 1
        g["stored"][t.type] += 1
        if len(g["examples"]) < 3:
            g["examples"].append(t.name)
    return {r: {**g, "stored": dict(sorted(g["stored"].items()))} for r, g in groups.items()}


def modelfile(gguf_name: str, template: str, eos: str | None, extra: tuple[str, ...] = (), chat=None) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, the prompt layout training used (`prompt.template`, a chat
    template rendered around Ollama's `{{ .Prompt }}`), and the project's stop sequences (prompts.stop_sequences)
    plus the model's EOS text."""
    try:
        body = render(template, "{{ .Prompt }}", "", chat)
    except ValueError as exc:
        raise StageError(f"prompt.template {template}: {exc} (the GGUF {gguf_name} has none)") from exc
    stops = [*stop_sequences(template, extra, end_token=eos), *([eos] if eos else [])]
    lines = [f"# Ollama: ollama create {Path(gguf_name).stem} -f {Path(gguf_name).stem}.Modelfile "
             f"(run it in this folder), then ollama run {Path(gguf_name).stem}",
             f"FROM ./{gguf_name}", f'TEMPLATE """{body}"""']
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def smoke_test(path: Path) -> None:
    """The quantized file loads in llama.cpp and yields finite logits."""
    import numpy as np

    from alpaca_lora_cpu.llama import all_logits, open_llama, tokenize

    # logits_all: without it llama-cpp-python never fills `scores`, and the check would read uninitialised memory.
    with open_llama(path, n_ctx=64, threads=os.cpu_count() or 1, logits_all=True) as llm:
        if not np.isfinite(all_logits(llm, tokenize(llm, "Hello, world"))).all():
            raise StageError(f"{path}: llama.cpp produced non-finite logits")


def run(plan: Plan, prompt: PromptParams, src: Path, out: Path, modelfile_out: Path,
        extra_stops: tuple[str, ...] = (), imatrix: Path | None = None) -> dict:
    from alpaca_lora_cpu.gguf_files import (
        bits_per_weight,
        chat_template,
        check_gguf,
        eos_text,
        tensor_infos,
        type_counts,
    )

    if plan.imatrix and (imatrix is None or not imatrix.is_file()):
        raise StageError(f"{plan.name} needs the importance matrix: {imatrix} not found (run the imatrix stage)")
    reader = check_gguf(src)
    ensure_writable(out)
    ensure_writable(modelfile_out)
    text = modelfile(out.name, prompt.template, eos_text(reader), extra_stops, chat_template(reader))
    with atomic_path(out) as tmp:
        seconds, lines = quantize_file(src, tmp, plan, imatrix if plan.imatrix else None)
        infos = tensor_infos(tmp)
        smoke_test(tmp)
        metrics = {
            "type": plan.name, "level": plan.qtype, "asked_tensor_type": asked_type(plan.qtype),
            "recipe": int(plan.recipe), "imatrix": int(plan.imatrix),
            "imatrix_entries": imatrix_entries(lines), "file_bytes": tmp.stat().st_size,
            "file_mib": tmp.stat().st_size / 2**20,
            "size_mb": tmp.stat().st_size / 1e6, "bits_per_weight": bits_per_weight(infos),
            "quantize_seconds": seconds, "source_bytes": src.stat().st_size, "tensors": len(infos),
            "tensor_types": type_counts(infos), "other_type": other_types(infos, plan, lines),
        }
        if plan.imatrix and not metrics["imatrix_entries"]:
            raise StageError(f"{plan.name}: llama.cpp did not report using the importance matrix {imatrix}")
        write_text(modelfile_out, text)
    return metrics


# The flat numbers (quantize/<type>.json); the whole record (tensor types and why) goes to <type>.details.json.
METRICS = {"size_mb": "size_mb", "bits_per_weight": "bits_per_weight", "imatrix": "imatrix", "recipe": "recipe",
           "imatrix_entries": "imatrix_entries", "tensors": "tensors", "seconds": "quantize_seconds"}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "src", "out", "modelfile", "metrics")
    ap.add_argument("--type", required=True, help="a quantize.types entry: q4_k_m, q4_k_m-imat or a recipe name")
    ap.add_argument("--imatrix", type=Path, help="llama.cpp GGUF imatrix file, for -imat types and recipes")
    ap.add_argument("--searched", type=Path, help="the search stage's recipe file, for the `searched` entry")
    args = parse_args(ap, argv)
    params = load_params(args.params)
    prompt = params.prompt
    plan = plan_for(args.type, params.quantize.recipes, args.searched)
    ensure_writable(args.metrics)
    from alpaca_lora_cpu.cost import check_mapped

    check_mapped(f"quantize@{args.type}", args.src, "convert.outtype (q8_0: a smaller reference)")
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    recipe = params.quantize.recipes.get(args.type) or (read_recipe(args.searched) if args.type == SEARCHED else None)
    # MLflow param names cannot hold regex characters: the overrides go in as one JSON value
    logged = {**as_dict(recipe), "overrides": json.dumps(recipe.overrides)} if recipe else None
    with stage_run("quantize", {"quantize": {"type": args.type, **({"recipe": logged} if logged else {})},
                                "prompt": as_dict(prompt), "generate": {"stop": list(params.generate.stop)}},
                   run_name=f"quantize@{args.type}") as mlflow:
        metrics = run(plan, prompt, args.src, args.out, args.modelfile, params.generate.stop, args.imatrix)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
    log.info("%s: %.1f MiB, %.2f bits/weight, %.1f s → %s", args.type, metrics["file_mib"],
             metrics["bits_per_weight"], metrics["quantize_seconds"], args.out)


if __name__ == "__main__":
    run_cli(main)
