"""evaluate: quality and speed of one GGUF variant (base, finetuned or a quantize.types entry).

Run (dvc.yaml: evaluate@<entry> per quantize.types entry, evaluate-reference@base and @finetuned):
  python -m stages.evaluate --params params.yaml --variant q4_0 --gguf models/gguf/finetuned-q4_0.gguf \
      --reference models/reference --metrics reports/metrics/evaluate/q4_0.json \
      --generations reports/evaluate/q4_0.generations.jsonl

- Quality on the reference's token sequences (held-out records, prompt masked, response + EOS scored):
  response perplexity; against finetuned (cached by the `reference` stage): mean KLD, p99, max,
  top-1 agreement and RMS Δp, as `llama-perplexity --kl-divergence` reports them.
- Generation: greedy answers (`evaluate.max_new_tokens`; `evaluate.parallel` of them decoded together) to the
  reference's prompts: ROUGE-L F1 against the reference outputs (rouge-score), mean response length in tokens,
  share that ended with EOS before the limit.
- Speed (fresh process, `evaluate.threads` fixed): prompt tok/s and generation tok/s, medians of
  `evaluate.speed.runs` after a warm-up; load time; peak RSS; file size; bits per weight.
The metrics carry the reference's `run_id` and the GGUF's sha256, so `report` can refuse mixed runs. Every
number's name, and which are the flat DVC metric, is alpaca_lora_cpu/metric_table.py's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import EvaluateParams, IntervalParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import read_json, read_jsonl, sha256_file, write_jsonl
from alpaca_lora_cpu.intervals import IFEVAL
from alpaca_lora_cpu.metrics import repeats_ngram
from alpaca_lora_cpu.openers import load_npz
from alpaca_lora_cpu.prompts import cut_at_stop, leaks_template, stop_sequences
from alpaca_lora_cpu.variants import FINETUNED, parse

log = logging.getLogger("evaluate")


@dataclass(frozen=True)
class Reference:
    meta: dict
    arrays: dict
    prompts: list[dict]


def load_reference(ref_dir: Path) -> Reference:
    files = [ref_dir / n for n in ("meta.json", "reference.npz", "prompts.jsonl")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StageError(f"reference {missing[0]} not found (run the reference stage)")
    meta = read_json(files[0], "reference")
    arrays = load_npz(files[1], what="reference", hint="rerun the reference stage")
    prompts = read_jsonl(files[2], "reference prompts", "rerun the reference stage", records=True)
    return Reference(meta, arrays, prompts)


def score(gguf: Path, ref: Reference, threads: int, iv: IntervalParams) -> dict:
    """Perplexity and the KLD statistics of the variant over every reference response position, with the
    per-record sums the intervals and the report's paired comparisons resample (one entry per record)."""
    from tqdm import tqdm

    from alpaca_lora_cpu.llama import open_llama, sequence_logits
    from alpaca_lora_cpu.metrics import TopK, compare_logits, summarize
    from alpaca_lora_cpu.stats import quantile_ci

    a = ref.arrays
    offsets, n_prompt = a["offsets"], a["n_prompt"]
    seqs = [(a["tokens"][offsets[i]:offsets[i + 1]].tolist(), int(n_prompt[i]) - 1) for i in range(len(n_prompt))]
    parts: dict[str, list] = {}
    pos = 0
    with open_llama(gguf, threads=threads, n_ctx=512) as llm:
        if llm.n_vocab() != ref.meta["n_vocab"]:
            raise StageError(f"{gguf}: vocabulary of {llm.n_vocab()} tokens, the reference has "
                             f"{ref.meta['n_vocab']}")
        # the same packing as the reference stage's (sequence_logits): finetuned scores exactly as the reference
        rows = sequence_logits(llm, seqs)
        for i, q in enumerate(tqdm(rows, total=len(seqs), desc=f"scoring {gguf.name}", unit="record")):
            ids = seqs[i][0]
            n = len(q)
            sl = slice(pos, pos + n)
            top = TopK(a["top_ids"][sl], a["top_logp"][sl], a["tail_logp"][sl], a["target_logp"][sl])
            for key, value in compare_logits(top, q, np.asarray(ids[int(n_prompt[i]):])).items():
                parts.setdefault(key, []).append(value)
            pos += n
    if pos != len(a["target_logp"]):
        raise StageError(f"internal: scored {pos} positions, the reference has {len(a['target_logp'])}")
    per_record = {"positions": [len(x) for x in parts["kld"]],
                  "logp": [float(np.sum(x)) for x in parts["target_logp"]],
                  "kld": [float(np.sum(x)) for x in parts["kld"]],
                  "top1": [int(np.sum(x)) for x in parts["same_top1"]],
                  "dp2": [float(np.sum(x ** 2)) for x in parts["delta_p"]]}
    record_of = np.repeat(np.arange(len(parts["kld"])), per_record["positions"])
    kld = np.concatenate(parts["kld"])
    p99 = quantile_ci(kld, record_of, 0.99, iv.resamples, iv.confidence, iv.seed)
    return {**summarize({k: np.concatenate(v) for k, v in parts.items()}), "per_record": per_record,
            "kld_p99_ci": list(p99)}


def generate_all(gguf: Path, ref: Reference, threads: int, max_new_tokens: int, parallel: int, template: str,
                 extra_stops: tuple[str, ...]) -> list[dict]:
    """Greedy answers without stop sequences (`raw`, what the stop/leak/repeat rates judge), and each cut where
    the project's stop sequences would end it (`text`, what users see, what ROUGE, the instruction checks and the
    report use); per answer its judgements, so that the rates resample by answer."""
    from rouge_score import rouge_scorer
    from tqdm import tqdm

    from alpaca_lora_cpu.ifeval import check
    from alpaca_lora_cpu.llama import eos_text, generate_many, open_llama

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = []
    with open_llama(gguf, threads=threads, n_ctx=2048) as llm:
        stops = stop_sequences(template, extra_stops, end_token=eos_text(llm))
        asked = [(p["prompt"], p.get("max_new_tokens") or max_new_tokens) for p in ref.prompts]
        with tqdm(total=len(asked), desc=f"generating {gguf.name} ({parallel} at a time)", unit="answer") as bar:
            answers = generate_many(llm, asked, parallel, on_done=bar.update)
        for p, g in zip(ref.prompts, answers, strict=True):
            text = cut_at_stop(g.text, stops)
            row = {"kind": p["kind"], "id": p["id"], "instruction": p.get("instruction"), "text": text,
                   "raw": g.text, "tokens": g.tokens, "eos": g.stopped, "leak": leaks_template(g.text),
                   "loop": repeats_ngram(g.text)}
            if p["kind"] == "val":
                row["rouge_l"] = scorer.score(p["reference"], text)["rougeL"].fmeasure
            if p["kind"] == IFEVAL:
                row[IFEVAL] = check(text, p["check"])
            rows.append(row)
    return rows


def generation_metrics(rows: list[dict]) -> dict:
    """ROUGE-L F1 (rouge-score, stemmed) of the cut answers against the reference outputs; on the raw answers:
    the share that ended with EOS before the limit, that wrote an Alpaca header (a template leak), that repeat
    a 4-gram 3 or more times, and their mean length in tokens; IFEval's strict and loose accuracies (prompt and
    instruction level) on the cut answers to the instruction-following prompts."""
    from alpaca_lora_cpu.intervals import answers, point

    return {"rouge_l": None, **point(answers(rows)),
            "rouge_prompts": sum(r["kind"] == "val" for r in rows),
            "ifeval_prompts": sum(r["kind"] == IFEVAL for r in rows),
            "generated_prompts": len(rows)}


def check_inputs(variant: str, gguf: Path, ref_dir: Path) -> Reference:
    """Everything that can be wrong with the inputs, before any model is loaded."""
    if not gguf.is_file():
        raise StageError(f"variant {variant}: GGUF file {gguf} not found (run the convert/quantize stages, or "
                         f"remove {variant!r} from quantize.types)")
    return load_reference(ref_dir)


def run(variant: str, gguf: Path, ref: Reference, params: EvaluateParams, iv: IntervalParams, template: str,
        extra_stops: tuple[str, ...]) -> tuple[dict, list[dict]]:
    from alpaca_lora_cpu.llama import bench, system_info

    gguf_sha = sha256_file(gguf)
    if variant == FINETUNED and gguf_sha != ref.meta["gguf_sha256"]:
        raise StageError(f"variant {variant}: {gguf} differs from the file the reference was computed on "
                         f"({ref.meta['gguf']}); rerun the reference stage")
    quality = score(gguf, ref, params.threads, iv)
    rows = generate_all(gguf, ref, params.threads, params.max_new_tokens, params.parallel, template, extra_stops)
    speed = bench(gguf, threads=params.threads, prompt_tokens=params.speed.prompt_tokens,
                  gen_tokens=params.speed.gen_tokens, runs=params.speed.runs)
    size = speed.pop("file_size_bytes")
    metrics = {
        "variant": variant,
        "run_id": ref.meta["run_id"],
        "gguf_sha256": gguf_sha,
        "size_mb": size / 1e6,
        "bits_per_weight": speed["tensor_bytes"] * 8 / speed["n_params"],
        **quality,
        **generation_metrics(rows),
        "speed": speed,
        "max_new_tokens": params.max_new_tokens,
        "llama_cpp": system_info(),
    }
    metrics["ci"] = with_intervals(metrics, rows, iv)
    return metrics, rows


def with_intervals(metrics: dict, rows: list[dict], iv: IntervalParams) -> dict[str, list[float]]:
    """name → [lo, hi] (`intervals.resamples` record-bootstrap resamples; speed: the range of the runs)."""
    from alpaca_lora_cpu.intervals import intervals, statistics

    out = intervals(statistics(metrics, rows), metrics["speed"], iv.resamples, iv.confidence, iv.seed)
    return {**out, "kld_p99": metrics.pop("kld_p99_ci")}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "gguf", "reference", "metrics", "generations")
    ap.add_argument("--variant", required=True)
    args = parse_args(ap, argv)
    config = load_params(args.params)
    params = config.evaluate
    ref = check_inputs(args.variant, args.gguf, args.reference)
    from alpaca_lora_cpu.cost import check_mapped

    check_mapped(f"evaluate@{args.variant}", args.gguf, f"quantize.types (drop {args.variant})")
    from alpaca_lora_cpu.metric_table import flat_paths
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    v = parse(args.variant, config.quantize.recipes)
    logged = {"variant": args.variant, "imatrix": v.imatrix, "recipe": v.recipe or "none", "kind": v.kind,
              "gguf": str(args.gguf),
              "threads": params.threads, "max_new_tokens": params.max_new_tokens, "parallel": params.parallel,
              "speed": as_dict(params.speed),
              "prompt": as_dict(config.prompt), "generate": {"stop": list(config.generate.stop)},
              "intervals": as_dict(config.intervals)}
    with stage_run("evaluate", logged, run_name=f"evaluate {args.variant}") as mlflow:
        metrics, rows = run(args.variant, args.gguf, ref, params, config.intervals, config.prompt.template,
                            config.generate.stop)
        write_jsonl(args.generations, rows)
        # The same flat keys for every variant: one row each of `dvc metrics show`, one chart each in MLflow.
        write_stage_metrics(mlflow, args.metrics, metrics, flat_paths())
        mlflow.log_metrics({f"{k}_ci_{end}": v for k, (lo, hi) in metrics["ci"].items()
                            for end, v in (("lo", lo), ("hi", hi)) if np.isfinite(v)})
        mlflow.set_tags({"variant": args.variant, "eval_run_id": metrics["run_id"]})
        mlflow.log_artifact(str(args.generations))
    log.info("%s: PPL %.3f, KLD %.5f, top-1 %.1f%%, gen %.1f tok/s", args.variant, metrics["ppl"],
             metrics["kld_mean"], 100 * metrics["top1"], metrics["speed"]["gen_tps"])


if __name__ == "__main__":
    run_cli(main)
