"""reference: the evaluation set and the fine-tuned reference GGUF's next-token distributions on it, computed once.

Run: python -m stages.reference --params params.yaml --gguf models/gguf/finetuned-reference.gguf \
         --merged models/merged --val data/prepared/val.jsonl --ifeval data/ifeval/prompts.jsonl \
         --out models/reference --metrics reports/metrics/reference.json

- Renders the held-out records with the prompt template (alpaca_lora_cpu/prompts.py: a conversation's last answer
  after everything before it) and tokenizes prompt and response with the GGUF's own tokenizer (prompt masked: only
  response tokens and the closing EOS are scored).
- Runs finetuned (llama.cpp, like `llama-perplexity --kl-divergence-base`) and stores, per response
  position, its top-`reference.top_k` log-probs, the exact log-mass of the rest and the correct token's
  log-prob (see src/alpaca_lora_cpu/metrics.py for why that is enough for KLD, top-1 and Δp).
- Stores the prompts every variant answers: the first `reference.generate_records` validation prompts, the
  fixed `reference.showcase_prompts` and the first `reference.ifeval_prompts` instruction-following prompts of
  `--ifeval` (data/ifeval/prompts.jsonl), each with the rules its answer is checked by.
- Caps both by the model's size: records are scored while parameters × their tokens stay within
  `reference.max_scored_ptokens`, answers kept while parameters × answers × `evaluate.max_new_tokens` stay within
  `reference.max_generated_ptokens` (the same cut on every machine; no cut for the 135M default).
- Measures Hugging Face transformers fp32 speed on models/merged (the "without llama.cpp" reference), with
  the same threads and prompt/generation lengths as `evaluate`, when the whole fp32 model fits the memory the
  stage may use (alpaca_lora_cpu/cost.py); otherwise it records why it was skipped.
Every `evaluate` metrics file carries this stage's `run_id`; `report` refuses files with different ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import ReferenceParams, SpeedParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, read_jsonl, sha256_file, write_json, write_jsonl
from alpaca_lora_cpu.intervals import IFEVAL
from alpaca_lora_cpu.prompts import last_turn, render, to_turns

log = logging.getLogger("reference")


def read_val(path: Path) -> list[dict]:
    """The prepared validation records (normalized by the prepare stage)."""
    return read_jsonl(path, "validation split", "nothing to evaluate: check data.val_size and data.max_samples, "
                      "then run the prepare stage", records=True)


def prompt_pairs(records: list[dict], template: str, gguf: Path, val: Path) -> list[tuple[str, str]]:
    """(prompt, reference answer) of each record, rendered with the GGUF's own chat template where `chat`."""
    from alpaca_lora_cpu.gguf_files import chat_template, check_gguf, eos_text

    reader = check_gguf(gguf)
    chat, eos = chat_template(reader), eos_text(reader) or ""
    pairs = []
    for i, record in enumerate(records):
        try:
            pairs.append(last_turn(to_turns(record, template, chat), eos))
        except ValueError as exc:  # the template cannot render it
            raise StageError(f"prompt.template {template}: {exc} ({gguf})") from exc
        except (AttributeError, KeyError, IndexError, TypeError) as exc:
            raise StageError(f"validation split {val}: record {i} is neither an Alpaca record nor a conversation "
                             f"({type(exc).__name__}: {exc}); rerun the prepare stage") from exc
    return pairs


def tokenized(gguf: Path, pairs: list[tuple[str, str]], params: ReferenceParams, threads: int):
    """(token ids and prompt length of each record, vocabulary size, the model's parameter count)."""
    from alpaca_lora_cpu.llama import n_params, open_llama, tokenize_record

    with open_llama(gguf, threads=threads, n_ctx=64) as probe:
        seqs = [tokenize_record(probe, prompt, answer, params.max_response_tokens) for prompt, answer in pairs]
        return seqs, probe.n_vocab(), n_params(probe)


def within(costs: list[float], budget: float) -> int:
    """How many of the items, in order, fit `budget` (at least one)."""
    total, n = 0.0, 0
    for c in costs:
        if n and total + c > budget:
            break
        total, n = total + c, n + 1
    return n


def answered(rows: list[dict], answers: int) -> list[dict]:
    """The first `answers` prompts, always keeping the first showcase prompt (the report compares every variant's
    answer to it)."""
    if answers >= len(rows):
        return rows
    first = next(r for r in rows if r["kind"] == "showcase")
    return [*[r for r in rows if r is not first][:answers - 1], first]


def score_reference(gguf: Path, seqs: list[tuple[list[int], int]], params: ReferenceParams, threads: int):
    """The reference's compact distributions over every response position of `seqs`."""
    from tqdm import tqdm

    from alpaca_lora_cpu.llama import open_llama, sequence_logits
    from alpaca_lora_cpu.metrics import log_probs, top_k_summary

    parts = []
    with open_llama(gguf, threads=threads, n_ctx=512) as llm:
        # the response rows as evaluate@<variant> computes them (sequence_logits: the same packing)
        rows = sequence_logits(llm, [(ids, n_prompt - 1) for ids, n_prompt in seqs])
        rows = tqdm(rows, total=len(seqs), desc="reference logits", unit="record")
        for (ids, n_prompt), q in zip(seqs, rows, strict=True):
            parts.append(top_k_summary(log_probs(q), np.asarray(ids[n_prompt:]), params.top_k))
    lengths = [len(ids) for ids, _ in seqs]
    return {
        "tokens": np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in seqs]),
        "offsets": np.cumsum([0, *lengths]).astype(np.int64),
        "n_prompt": np.asarray([n for _, n in seqs], dtype=np.int64),
        "top_ids": np.concatenate([p.ids for p in parts]),
        "top_logp": np.concatenate([p.logp for p in parts]),
        "tail_logp": np.concatenate([p.tail_logp for p in parts]),
        "target_logp": np.concatenate([p.target_logp for p in parts]),
    }


def hf_speed(merged: Path, threads: int, speed: SpeedParams) -> dict:
    """transformers fp32 on the merged checkpoint: prompt tok/s (one forward) and greedy generate tok/s; a
    `skipped` reason instead when the whole fp32 model does not fit the memory this stage may use."""
    from alpaca_lora_cpu.cost import Shape, fits_hf_speed

    shape = Shape.read(merged)
    if not fits_hf_speed(shape):
        from alpaca_lora_cpu.memory import available_memory

        reason = (f"the fp32 model ({4 * shape.params / 1e9:.1f} GB) does not fit the "
                  f"{available_memory() / 1e9:.1f} GB this stage may use")
        log.warning("transformers fp32 speed skipped: %s", reason)
        return {"skipped": reason, "threads": threads}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_lora_cpu.llama import FILLER
    from alpaca_lora_cpu.metrics import speed_runs

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok(FILLER * (speed.prompt_tokens // 8 + 2), return_tensors="pt").input_ids[:, :speed.prompt_tokens]
    eos = tok.eos_token_id

    def pp() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(ids)
            return speed.prompt_tokens / (time.perf_counter() - t0)

    def tg() -> float:
        first = ids[:, :1]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(first, attention_mask=torch.ones_like(first), do_sample=False,
                                 max_new_tokens=speed.gen_tokens, min_new_tokens=speed.gen_tokens,
                                 pad_token_id=eos)
            elapsed = time.perf_counter() - t0
        return (out.shape[1] - 1) / elapsed

    return {"load_s": load_s, **speed_runs(pp, tg, speed.runs), "threads": threads, "torch": torch.__version__}


def ifeval_rows(prompts: list[dict], params: ReferenceParams, template: str, chat: str | None) -> list[dict]:
    """The instruction-following prompts as prompts every variant answers, each with the rules its answer is
    checked against (alpaca_lora_cpu/ifeval.py)."""
    return [{"kind": IFEVAL, "id": p["key"], "instruction": p["prompt"], "reference": None,
             "prompt": render(template, p["prompt"], "", chat), "max_new_tokens": params.ifeval_max_new_tokens,
             "check": {k: p[k] for k in ("prompt", "instruction_id_list", "kwargs")}} for p in prompts]


def source_of(val: Path) -> str:
    """Which data the validation split was drawn from (the prepare stage's manifest beside it), for the report's
    labels: the bundled sample's own held-out part is not the real distribution."""
    from alpaca_lora_cpu.files import read_json

    manifest = val.parent / "manifest.json"
    if not manifest.is_file():
        return "unknown (no manifest beside the validation split)"
    m = read_json(manifest, "prepare manifest")
    return f"{m.get('source_used')} (held-out split{', offline fallback' if m.get('offline_fallback') else ''})"


def run_id_of(gguf_sha: str, val_sha: str, params: ReferenceParams, template: str, checks: list[dict]) -> str:
    """An identifier of exactly what was measured: the reference model, the data and how it was scored."""
    blob = json.dumps({"gguf": gguf_sha, "val": val_sha, "params": as_dict(params), "template": template,
                       "ifeval": checks}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_inputs(gguf: Path, merged: Path, val: Path, ifeval: Path) -> tuple[list[dict], list[dict]]:
    """The validation records and the instruction-following prompts, once every input is known to be there
    (before any model is loaded)."""
    from alpaca_lora_cpu.ifeval import load_prompts

    records, prompts = read_val(val), load_prompts(ifeval)
    if not gguf.is_file():
        raise StageError(f"reference model {gguf} not found (run the convert stage)")
    if not (merged / "config.json").is_file():
        raise StageError(f"merged checkpoint {merged} not found (run the merge stage)")
    return records, prompts


def run(params: ReferenceParams, template: str, threads: int, speed: SpeedParams, gguf: Path, merged: Path,
        val: Path, records: list[dict], out_dir: Path, max_new_tokens: int = 256,
        ifeval: list[dict] | None = None) -> dict:
    from alpaca_lora_cpu.gguf_files import chat_template, check_gguf

    records = records[:params.max_records] if params.max_records else records
    ifeval = ifeval or []
    pairs = prompt_pairs(records, template, gguf, val)
    seqs, n_vocab, n_params = tokenized(gguf, pairs, params, threads)
    n_scored = within([len(ids) * n_params for ids, _ in seqs], params.max_scored_ptokens)
    pairs, seqs = pairs[:n_scored], seqs[:n_scored]
    chat = chat_template(check_gguf(gguf))
    rows = [{"kind": "val", "id": i, "prompt": pairs[i][0], "reference": pairs[i][1]}
            for i in range(min(params.generate_records or n_scored, n_scored))]
    rows += [{"kind": "showcase", "id": i, "instruction": text, "prompt": render(template, text, "", chat),
              "reference": None} for i, text in enumerate(params.showcase_prompts)]
    rows += ifeval_rows(ifeval[:params.ifeval_prompts], params, template, chat)
    answers = within([n_params * r.get("max_new_tokens", max_new_tokens) for r in rows], params.max_generated_ptokens)
    rows = answered(rows, answers)
    n_gen = sum(r["kind"] == "val" for r in rows)
    gguf_sha, val_sha = sha256_file(gguf), sha256_file(val)
    arrays = score_reference(gguf, seqs, params, threads)
    hf = hf_speed(merged, threads, speed)
    run_id = run_id_of(gguf_sha, val_sha, params, template, [r["check"] for r in rows if r["kind"] == IFEVAL])
    meta = {
        "run_id": run_id, "gguf": str(gguf), "gguf_sha256": gguf_sha, "val": str(val), "val_sha256": val_sha,
        "records": n_scored, "positions": int(len(arrays["target_logp"])), "n_vocab": n_vocab,
        "prompt_template": template, "params": as_dict(params),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        np.savez_compressed(tmp / "reference.npz", **arrays)
        write_jsonl(tmp / "prompts.jsonl", rows)
        write_json(tmp / "meta.json", meta)
    from alpaca_lora_cpu.metrics import perplexity

    return {"run_id": run_id, "records": meta["records"], "positions": meta["positions"],
            "records_cut_by_budget": len(records) - n_scored, "parameters": n_params,
            "generate_prompts": n_gen, "showcase_prompts": sum(r["kind"] == "showcase" for r in rows),
            "ifeval_prompts": sum(r["kind"] == IFEVAL for r in rows),
            "ifeval_instructions": sum(len(r["check"]["instruction_id_list"]) for r in rows if r["kind"] == IFEVAL),
            "val_source": source_of(val),
            "top_k": params.top_k, "reference_ppl": perplexity(arrays["target_logp"]),
            "gguf_sha256": gguf_sha, "val_sha256": val_sha, "hf_fp32": hf}


# The flat numbers (reference.json); the whole record goes to reference.details.json, which evaluate and report read.
METRICS = {"ppl": "reference_ppl", "hf_gen_tps": "hf_fp32.gen_tps", "hf_prompt_tps": "hf_fp32.prompt_tps",
           "positions": "positions", "records": "records"}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "gguf", "merged", "val", "out", "metrics")
    ap.add_argument("--ifeval", type=Path, required=True, help="instruction-following prompts (JSONL, IFEval's format)")
    args = parse_args(ap, argv)
    config = load_params(args.params)
    params, template, ev = config.reference, config.prompt.template, config.evaluate
    records, ifeval = check_inputs(args.gguf, args.merged, args.val, args.ifeval)
    from alpaca_lora_cpu.cost import check_mapped

    check_mapped("reference", args.gguf, "convert.outtype (q8_0: a smaller reference)")
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("reference", {"reference": as_dict(params), "prompt": {"template": template},
                                 "evaluate": {"threads": ev.threads, "speed": as_dict(ev.speed),
                                              "max_new_tokens": ev.max_new_tokens}}) as mlflow:
        metrics = run(params, template, ev.threads, ev.speed, args.gguf, args.merged, args.val, records, args.out,
                      ev.max_new_tokens, ifeval)
        # a skipped transformers speed row leaves its two numbers out
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS, strict=False)
        mlflow.set_tags({"eval_run_id": metrics["run_id"]})
        mlflow.log_artifact(str(args.out / "meta.json"))
    log.info("reference %s: %d records, %d response positions, PPL %.3f; transformers fp32 %s", metrics["run_id"],
             metrics["records"], metrics["positions"], metrics["reference_ppl"],
             metrics["hf_fp32"].get("skipped") or f"{metrics['hf_fp32']['gen_tps']:.1f} gen tok/s")


if __name__ == "__main__":
    run_cli(main)
