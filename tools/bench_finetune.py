"""bench-finetune: this stage's default training vs a reproduction of tloen/alpaca-lora's finetune.py loop, on CPU.

Run: make bench-finetune [BENCH_SOURCE=alpaca_data_cleaned.json]
     (or: python -m tools.bench_finetune --base models/base --samples 32 [--source FILE])

Same base model (models/base), same records, same LoRA targets and hyperparameters (params.yaml `finetune`),
same number of training samples. What differs is only the loop semantics:
  reference  alpaca-lora: fp32, eager attention (transformers 4.28 had no SDPA), DataCollatorForSeq2Seq padding
             (pad_to_multiple_of=8) of random batches, no length grouping, train_on_inputs true, full-vocab
             logits at every position (the model's own loss)
  stage      this stage's default params: packed padding-free micro-batches with per-example SDPA attention
             (src/alpaca_lora_cpu/packing.py), loss and logits on response tokens only
Printed: non-pad training tokens/s of each, the ratio, and each one's loss on the validation responses after
the same samples (the stage's eval, identical for both). `--levers` adds a short throughput run per lever,
each switched on alone over the reference. Records come from data/prepared/train.jsonl and val.jsonl
(read-only), or with `--source FILE` from a JSON/JSONL/parquet file in the `data.format` layout (a seeded
sample of it, validated as the prepare stage does), e.g. the real alpaca-cleaned data. Other processes sharing
the CPU move the numbers, so the load average is printed too.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import FinetuneParams, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import read_jsonl, write_json
from alpaca_lora_cpu.packing import real_tokens
from alpaca_lora_cpu.records import Loaded, clean, read_local
from alpaca_lora_cpu.tokenization import encode_all, load_tokenizer
from alpaca_lora_cpu.training import (
    choose_precision,
    evaluate_responses,
    load_model,
    make_collator,
    trainer_class,
    training_args,
)
from tools.bench_doc import DOC_TITLE, machine_stamp, replace_section


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    group_by_length: bool
    train_on_inputs: bool
    response_logits: bool
    attention: str  # eager | sdpa
    precision: str = "fp32"
    pad_to_multiple_of: int | None = None
    packing: bool = False  # packed rows attend per example (src/alpaca_lora_cpu/packing.py) whatever `attention` says


REFERENCE = Setup("reference (alpaca-lora loop)", False, True, False, "eager", "fp32", 8)


def stage_setup(p: FinetuneParams, auto: str) -> Setup:
    """The stage's params; `precision: auto` resolved to `auto`, what the stage's probe chose on this machine."""
    precision = auto if p.precision == "auto" else p.precision
    name = f"stage defaults (precision auto → {auto})" if p.precision == "auto" else "stage defaults"
    return Setup(name, p.group_by_length, p.train_on_inputs, True, "sdpa", precision, None, p.packing)


LEVERS = [
    dataclasses.replace(REFERENCE, name="+ length grouping", group_by_length=True),
    dataclasses.replace(REFERENCE, name="+ no pad_to_multiple_of=8", pad_to_multiple_of=None),
    dataclasses.replace(REFERENCE, name="+ SDPA attention", attention="sdpa"),
    dataclasses.replace(REFERENCE, name="+ packing (per-example SDPA)", packing=True, pad_to_multiple_of=None),
    dataclasses.replace(REFERENCE, name="+ response-only loss/logits", train_on_inputs=False, response_logits=True),
    dataclasses.replace(REFERENCE, name="+ bf16 autocast", precision="bf16"),
]


def reference_trainer():
    """The plain Trainer loss (full logits, the model's own masked loss), counting non-pad tokens."""
    from transformers import Trainer

    class Reference(Trainer):
        train_tokens = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.train_tokens += real_tokens(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Reference


def train_once(setup: Setup, params: FinetuneParams, base: Path, tokenizer, prompt: str, train: list,
               val_set: list, samples: int, evaluate: bool) -> dict:
    import torch
    from transformers import set_seed

    p = dataclasses.replace(params, group_by_length=setup.group_by_length, train_on_inputs=setup.train_on_inputs,
                            precision=setup.precision, packing=setup.packing, max_steps=samples // params.batch_size,
                            eval_steps=10**9, save_steps=10**9, warmup_steps=0)  # a warm-up would eat the few steps
    set_seed(p.seed)
    model = load_model(base, p)
    if not setup.packing:
        model.base_model.model.set_attn_implementation(setup.attention)
    train_set = encode_all(train, tokenizer, prompt, p.cutoff_len, p.train_on_inputs, "train")
    out = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        args = training_args(p, out)
        args.eval_strategy = args.save_strategy = "no"
        args.disable_tqdm = True
        cls = trainer_class() if setup.response_logits else reference_trainer()
        trainer = cls(model=model, args=args, train_dataset=train_set,
                      data_collator=make_collator(tokenizer, setup.pad_to_multiple_of, setup.packing),
                      processing_class=tokenizer)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = {"setup": setup.name, "tokens": trainer.train_tokens, "seconds": seconds,
              "tokens_per_s": trainer.train_tokens / seconds, "samples": trainer.state.global_step * p.batch_size,
              "threads": torch.get_num_threads()}
    if evaluate:
        # fp32 eval whatever the training precision (accelerate leaves forward under autocast otherwise)
        fp32_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        result.update(evaluate_responses(fp32_model, val_set, make_collator(tokenizer), p.micro_batch_size))
    return result


def matmul_peak(n: int = 2048) -> float:
    """GFLOP/s of the best of 3 fp32 n³ matmuls: what this machine's BLAS reaches at best."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(3))
    return 2 * n**3 / best / 1e9


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile_stage(setup: Setup, params: FinetuneParams, base: Path, tokenizer, prompt: str, train: list,
                  val_set: list, samples: int) -> None:
    """torch.profiler over a stage-defaults run: the top operators, and the matmuls' speed.

    Counting FLOPs records every op's shapes, which inflates the small ops' times, so the shares come from a
    plain profile and the matmul FLOPs from a second, identical run.
    """
    from torch.profiler import ProfilerActivity, profile

    def ops(with_flops: bool):
        with profile(activities=[ProfilerActivity.CPU], with_flops=with_flops) as prof:
            train_once(setup, params, base, tokenizer, prompt, train[:samples], val_set, samples,
                       False)
        return {op.key: op for op in prof.key_averages()}

    timed_ops, counted = ops(False), ops(True)
    total = sum(op.self_cpu_time_total for op in timed_ops.values())
    print(f"profile of stage defaults ({samples} samples), share of CPU time:", flush=True)
    for op in sorted(timed_ops.values(), key=lambda op: op.self_cpu_time_total, reverse=True)[:8]:
        print(f"  {op.key[:60]:<60} {100 * op.self_cpu_time_total / total:5.1f}%", flush=True)
    if "aten::mm" in timed_ops and "aten::mm" in counted:
        rate = counted["aten::mm"].flops / timed_ops["aten::mm"].self_cpu_time_total / 1e3
        print(f"  aten::mm ran at {rate:.0f} GFLOP/s", flush=True)


def records(args: argparse.Namespace, fmt: str) -> tuple[list[dict], list[dict]]:
    """(train, val) records: the prepared splits, or a seeded sample of a file in the `data.format` layout."""
    if args.source is None:
        train, val = (read_jsonl(args.data / f"{split}.jsonl", "data split") for split in ("train", "val"))
        return train[: args.samples], val[: args.val]
    valid, _ = clean(Loaded(read_local(args.source, fmt), str(args.source), False, fmt), "drop")
    if len(valid) < args.samples + args.val:
        raise StageError(f"--source {args.source}: {len(valid)} valid records, need {args.samples + args.val}")
    chosen = random.Random(args.seed).sample(valid, args.samples + args.val)
    return chosen[: args.samples], chosen[args.samples:]


def doc_section(args: argparse.Namespace, results: list[dict], main_rows: int, header: str) -> str:
    """The Markdown docs/benchmarks.md gets: the stamp, the exact command, the side-by-side table, the levers."""
    ref = results[0]
    command = " ".join(["python -m tools.bench_finetune", *args.argv])
    lines = [f"## bench-finetune: {machine_stamp(args.doc)}", "", f"`{command}`", "", header, "",
             "| run | samples | non-pad tokens/s | × reference | eval loss |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results[:main_rows]:
        lines.append(f"| {r['setup']} | {r['samples']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f} | {r['eval_loss']:.4f} |")
    if len(results) > main_rows:
        lever_ref = results[main_rows]
        lines += ["", f"Each lever alone over the reference ({lever_ref['samples']} samples each):", "",
                  "| lever | tokens/s | × reference |", "| --- | ---: | ---: |"]
        lines += [f"| {r['setup']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / lever_ref['tokens_per_s']:.2f} |"
                  for r in results[main_rows:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--base", type=Path, default=Path("models/base"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--source", type=Path, help="a JSON/JSONL/parquet file (data.format) to sample instead of --data")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed for --source")
    ap.add_argument("--samples", type=int, default=32, help="training samples per run (a multiple of batch_size)")
    ap.add_argument("--val", type=int, default=18, help="validation records for the eval loss")
    ap.add_argument("--levers", action="store_true", help="also time each lever alone")
    ap.add_argument("--lever-samples", type=int, default=8, help="training samples per lever run")
    ap.add_argument("--profile", action="store_true",
                    help="profile a stage-defaults run (--lever-samples samples): where the time goes")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--doc", type=Path, help="write the results as a stamped section of this Markdown file")
    args = parse_args(ap, argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    config = load_params(args.params)
    # One optimizer step per micro-batch: a short run still moves the adapter, so the eval losses compare.
    params = dataclasses.replace(config.finetune, batch_size=config.finetune.micro_batch_size)
    prompt = config.prompt.template
    tokenizer = load_tokenizer(args.base)
    train, val = records(args, config.data.format)
    val_set = encode_all(val, tokenizer, prompt, params.cutoff_len, False, "val")
    header = (f"bench-finetune: {args.base}, {args.source or args.data}, {len(train)} training samples, "
              f"{len(val_set)} val records, batch {params.batch_size}/{params.micro_batch_size}, "
              f"targets {params.lora.target_modules}, "
              f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
              f"fp32 matmul peak {matmul_peak():.0f} GFLOP/s (2048³ torch.mm)")
    auto, probe = choose_precision("auto", params.bf16_min_speedup)
    header += (f"; precision auto → {auto}" + (f" (bf16 matmul {probe['precision_probe_bf16_speedup']:.2f}× fp32, "
               f"threshold {params.bf16_min_speedup}×)" if "precision_probe_bf16_speedup" in probe else ""))
    print(header, flush=True)
    setups = [REFERENCE, stage_setup(params, auto)]
    if setups[1].precision != auto:  # the stage's own precision is fixed: also show what auto would give
        setups.append(dataclasses.replace(setups[1], name=f"stage defaults, precision auto → {auto}", precision=auto))
    if auto == "bf16":  # where bf16 is emulated (AVX2-only CPUs) auto trains in fp32: that path, measured here
        setups.append(dataclasses.replace(setups[1], name="stage defaults in fp32 (auto's choice where bf16 is slow)",
                                          precision="fp32"))
    results = []
    for setup in setups:
        r = train_once(setup, params, args.base, tokenizer, prompt, train, val_set, args.samples, evaluate=True)
        results.append(r)
        print(f"  {r['setup']:<32} {r['tokens_per_s']:8.1f} non-pad tokens/s  ({r['tokens']} tokens in "
              f"{r['seconds']:.0f} s)  eval loss {r['eval_loss']:.4f}", flush=True)
    ref = results[0]
    for setup, r in zip(setups[1:], results[1:], strict=True):
        # Targets: >= 2.0x where bf16 is native, >= 1.5x in fp32 (AVX2-only CPUs); eval loss within 1%.
        print(f"{r['setup']}: {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x the reference (target >= "
              f"{2.0 if setup.precision == 'bf16' else 1.5}); eval loss {r['eval_loss']:.4f} vs {ref['eval_loss']:.4f} "
              f"({(r['eval_loss'] / ref['eval_loss'] - 1) * 100:+.2f}%)", flush=True)
    if args.levers:
        half = args.lever_samples
        print(f"levers, each alone over the reference ({half} samples each):", flush=True)
        base_r = train_once(REFERENCE, params, args.base, tokenizer, prompt, train[:half], val_set, half, False)
        results.append(base_r)
        print(f"  {'reference':<32} {base_r['tokens_per_s']:8.1f} tokens/s", flush=True)
        for lever in LEVERS:
            r = train_once(lever, params, args.base, tokenizer, prompt, train[:half], val_set, half, False)
            results.append(r)
            print(f"  {lever.name:<32} {r['tokens_per_s']:8.1f} tokens/s  "
                  f"({r['tokens_per_s'] / base_r['tokens_per_s']:.2f}x)", flush=True)
    if args.profile:
        profile_stage(setups[1], params, args.base, tokenizer, prompt, train, val_set, args.lever_samples)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        write_json(args.json, results)
    if args.doc:
        replace_section(args.doc, "bench-finetune", doc_section(args, results, len(setups), header),
                        title=DOC_TITLE)


if __name__ == "__main__":
    run_cli(main)
