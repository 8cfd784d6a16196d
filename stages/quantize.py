"""quantize: the reference GGUF → one llama.cpp quantization level, with an Ollama Modelfile beside it.

Run (dvc.yaml runs one `quantize@<type>` per entry of `quantize.types`, each cached on its own):
    python -m stages.quantize --params params.yaml --type q4_k_m --src models/gguf/finetuned-reference.gguf \
        --imatrix models/imatrix/imatrix.gguf --searched models/search/recipe.json --merged models/merged \
        --data data/prepared --hessians models/imatrix/hessians --gptq-blocks models/search/gptq-blocks \
        --out models/gguf/finetuned-q4_k_m.gguf --modelfile models/gguf/finetuned-q4_k_m.Modelfile \
        --metrics reports/metrics/quantize/q4_k_m.json

A `<level>-ar` entry (q4_0-ar) is the level's llama.cpp file with each tensor rounded by AutoRound instead
(alpaca_lora_cpu/autoround.py: SignRound on models/merged over the imatrix's calibration text, `--merged`,
`--data`, quantize.autoround), in the same types, so of the same size and metadata. A `<level>-gptq` entry
(q4_0-gptq, q5_0-gptq, iq4_nl-gptq) is the same with each Q4_0 / Q5_0 / IQ4_NL tensor rounded by GPTQ over the
imatrix stage's input covariances (`--hessians`, alpaca_lora_cpu/gptq.py, quantize.gptq); its details record each
tensor's proxy error tr(ΔW H ΔWᵀ) beside llama.cpp's plain and imatrix rounding of the same level. A
`<recipe>-gptq` entry (searched-gptq) does the same to the recipe's own file. A tensor the search stage already
rounded from the same weights, covariance and options (`--gptq-blocks`, gptq.RoundedBlocks) takes its blocks
from there: the same bytes, without a second GPTQ pass (the details count them as `reused`).

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
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import AutoRoundParams, GptqParams, Params, PromptParams, as_dict, load_params
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
    recipe_gptq,
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


@dataclass(frozen=True)
class AutoRoundJob:
    """What an -ar level rounds: the merged checkpoint, the packed calibration rows, quantize.autoround."""
    merged: Path
    rows: list[list[int]]
    params: AutoRoundParams


def autoround_job(params: Params, merged: Path | None, data: Path | None) -> AutoRoundJob:
    """The calibration rows of an -ar level: the imatrix's calibration text (imatrix.source, cut as the imatrix
    cuts it), packed into quantize.autoround.nsamples rows of seqlen tokens."""
    from transformers import AutoTokenizer

    from alpaca_lora_cpu.autoround import calibration_chunks
    from alpaca_lora_cpu.calibration import calibration_records, token_sequences
    from alpaca_lora_cpu.shards import checkpoint_files

    if merged is None or data is None:
        raise StageError("an -ar level needs --merged (the merged checkpoint) and --data (the prepared data)")
    checkpoint_files(merged, "merged model")
    records, _ = calibration_records(params.imatrix.source, params.data.format, data)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    sequences = token_sequences(records, tokenizer, params.prompt.template, params.imatrix)
    ar = params.quantize.autoround
    return AutoRoundJob(merged, calibration_chunks(sequences, ar.nsamples, ar.seqlen), ar)


def quantize_autoround(src: Path, dst: Path, plan: Plan, job: AutoRoundJob) -> tuple[float, list[str], dict]:
    """llama.cpp's file of the plan's level (the layout), then AutoRound's rounding of each tensor it stores in
    the same type; (seconds of both, llama.cpp's log lines, what was taken and kept)."""
    from alpaca_lora_cpu.autoround import make

    layout = dst.with_name(dst.name + ".llama-cpp.gguf")
    try:
        seconds, lines = quantize_file(src, layout, Plan(plan.name, plan.qtype, False))
        details = make(job.merged, plan.qtype, job.rows, job.params, layout, dst)
        details |= {"llama_cpp_bytes": layout.stat().st_size, "llama_cpp_seconds": seconds}
    finally:
        layout.unlink(missing_ok=True)
    if dst.stat().st_size != details["llama_cpp_bytes"]:
        raise StageError(f"{plan.name}: {dst.stat().st_size} bytes, llama.cpp's {plan.qtype} file "
                         f"{details['llama_cpp_bytes']}: the transplant changed the size")
    return seconds + details["autoround_seconds"], lines, details


def quantize_gptq(src: Path, dst: Path, plan: Plan, imatrix: Path | None, hessians: Path | None,
                  options: GptqParams, joint_refit: bool = False, blocks: Path | None = None
                  ) -> tuple[float, list[str], dict]:
    """llama.cpp's file of the plan's level (plain) or recipe (as the recipe says) is the layout; GPTQ then rounds
    each of its Q4_0 / Q5_0 / IQ4_NL tensors over the input covariances. The proxy errors are compared with the
    layout's and with llama.cpp's imatrix rounding of the same types (for an imatrix recipe: the layout itself).
    A recipe whose types end in -gptq (a searched recipe's iq4_nl-gptq groups) has just those tensors rounded.
    (seconds, llama.cpp's log lines, per-tensor proxy errors and how many fell below each rival.) `joint_refit`
    (gptq.refit, off in the pipeline) is for make bench-gptq. `blocks`: the search's kept blocks, reused where
    their inputs match."""
    import dataclasses
    import time

    from tqdm import tqdm

    from alpaca_lora_cpu.gptq import Hessians, RoundedBlocks, gptq_tensors, make, rounded_by

    if hessians is None or imatrix is None or not imatrix.is_file():
        raise StageError(f"{plan.name} needs the imatrix stage's --imatrix file and --hessians folder "
                         "(imatrix.covariance: true)")
    h = Hessians(hessians)
    store = RoundedBlocks(blocks) if blocks is not None and blocks.is_dir() else None
    only = rounded_by(None if plan.gptq else (lambda name: recipe_gptq(plan, name)), options.head)
    base = dataclasses.replace(plan, gptq=False)
    layout, rival = (dst.with_name(dst.name + suffix) for suffix in (".llama-cpp.gguf", ".imatrix.gguf"))
    try:
        seconds, lines = quantize_file(src, layout, base, imatrix if base.imatrix else None)
        if base.imatrix:
            rival = layout
        else:
            quantize_file(src, rival, dataclasses.replace(base, imatrix=True), imatrix)
        t0 = time.perf_counter()
        chosen = gptq_tensors(layout, h, only)
        if not plan.gptq:
            check_gptq_asked(layout, plan, {t.name for t in chosen})
        with tqdm(total=len(chosen), unit="tensor", desc=f"GPTQ {plan.name}") as bar:
            details = make(layout, src, h, options.damp, dst, compare=rival, progress=lambda _: bar.update(),
                           act_order=options.act_order, joint_refit=joint_refit, only=only, store=store)
        gptq_seconds = time.perf_counter() - t0
        if store is not None:
            log.info("%s: %d of %d tensors' GPTQ blocks reused from %s", plan.name, details["reused"],
                     details["tensors"], blocks)
    finally:
        layout.unlink(missing_ok=True)
        rival.unlink(missing_ok=True)
    errors = details["proxy_error"].values()
    details |= {"gptq_seconds": gptq_seconds, "covariance_tokens": h.tokens,
                "proxy_error_sum": {k: sum(e[k] for e in errors) for k in ("gptq", "llama_cpp", "compare")},
                "below_plain": sum(e["gptq"] < e["llama_cpp"] for e in errors),
                "below_imatrix": sum(e["gptq"] < e["compare"] for e in errors)}
    return seconds + gptq_seconds, lines, details


def check_gptq_asked(layout: Path, plan: Plan, rounded: set[str]) -> None:
    """Every tensor the recipe asks GPTQ for gets it: GPTQ needs the tensor's input covariance (decoder linears
    only, not token_embd / output) and its type in one of gptq.FORMATS as llama.cpp stored it."""
    from alpaca_lora_cpu.gguf_files import tensor_infos

    missed = [t for t in tensor_infos(layout) if recipe_gptq(plan, t.name) and t.name not in rounded]
    if missed:
        raise StageError(f"{plan.name}: the recipe asks GPTQ for {missed[0].name} ({missed[0].type}), which GPTQ "
                         f"cannot round: no input covariance (the output matrix: quantize.gptq.head false), or not a "
                         f"Q4_0 / Q5_0 / IQ4_NL tensor "
                         f"({len(missed)} such tensor(s)); give it a plain type")


def run(plan: Plan, prompt: PromptParams, src: Path, out: Path, modelfile_out: Path,
        extra_stops: tuple[str, ...] = (), imatrix: Path | None = None, job: AutoRoundJob | None = None,
        hessians: Path | None = None, gptq_options: GptqParams | None = None, gptq_blocks: Path | None = None
        ) -> dict:
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
        autoround = gptq = None
        if plan.rounds_gptq:
            if gptq_options is None:
                raise StageError(f"{plan.name}: a -gptq level needs quantize.gptq")
            seconds, lines, gptq = quantize_gptq(src, tmp, plan, imatrix, hessians, gptq_options,
                                                 blocks=gptq_blocks)
        elif plan.autoround:
            if job is None:
                raise StageError(f"{plan.name}: an -ar level needs the merged model and calibration rows")
            seconds, lines, autoround = quantize_autoround(src, tmp, plan, job)
        else:
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
            "autoround": int(plan.autoround), **({"autoround_details": autoround} if autoround else {}),
            "gptq": int(plan.rounds_gptq), **({"gptq_details": gptq} if gptq else {}),
        }
        if plan.imatrix and not metrics["imatrix_entries"]:
            raise StageError(f"{plan.name}: llama.cpp did not report using the importance matrix {imatrix}")
        write_text(modelfile_out, text)
    return metrics


# The flat numbers (quantize/<type>.json); the whole record (tensor types and why) goes to <type>.details.json.
METRICS = {"size_mb": "size_mb", "bits_per_weight": "bits_per_weight", "imatrix": "imatrix", "recipe": "recipe",
           "imatrix_entries": "imatrix_entries", "tensors": "tensors", "seconds": "quantize_seconds",
           "autoround": "autoround", "gptq": "gptq"}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "src", "out", "modelfile", "metrics")
    ap.add_argument("--type", required=True, help="a quantize.types entry: q4_k_m, q4_k_m-imat or a recipe name")
    ap.add_argument("--imatrix", type=Path, help="llama.cpp GGUF imatrix file, for -imat types and recipes")
    ap.add_argument("--searched", type=Path, help="the search stage's recipe file, for the `searched` entry")
    ap.add_argument("--merged", type=Path, help="the merged checkpoint, for the -ar levels (AutoRound)")
    ap.add_argument("--data", type=Path, help="the prepared data (imatrix.source's calibration text), for -ar levels")
    ap.add_argument("--hessians", type=Path, help="the imatrix stage's input covariances, for the -gptq levels")
    ap.add_argument("--gptq-blocks", type=Path, help="the search's kept GPTQ blocks, reused by the -gptq levels")
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
    job = autoround_job(params, args.merged, args.data) if plan.autoround else None
    ar = {"autoround": as_dict(params.quantize.autoround)} if job else {}
    ar |= {"gptq": as_dict(params.quantize.gptq)} if plan.gptq else {}
    with stage_run("quantize", {"quantize": {"type": args.type, **({"recipe": logged} if logged else {}), **ar},
                                "prompt": as_dict(prompt), "generate": {"stop": list(params.generate.stop)}},
                   run_name=f"quantize@{args.type}") as mlflow:
        metrics = run(plan, prompt, args.src, args.out, args.modelfile, params.generate.stop, args.imatrix, job,
                      args.hessians, params.quantize.gptq, args.gptq_blocks)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
    log.info("%s: %.1f MiB, %.2f bits/weight, %.1f s → %s", args.type, metrics["file_mib"],
             metrics["bits_per_weight"], metrics["quantize_seconds"], args.out)


if __name__ == "__main__":
    run_cli(main)
