"""finetune: train a LoRA adapter (optionally 8-bit / 4-bit QLoRA) on data/prepared over models/base.

Run: python -m stages.finetune --params params.yaml --base models/base --data data/prepared \
       --out models/adapter --checkpoints models/checkpoints/finetune \
       --metrics reports/metrics/finetune.json --plots reports/plots/finetune --accelerate-configs configs/accelerate
Distributed: the same command with `finetune.processes` > 1 (e.g. `dvc exp run -S finetune.processes=8`); the
stage then starts itself under `accelerate launch` with configs/accelerate/<finetune.accelerate_config>.yaml.

The recipe is tloen/alpaca-lora's finetune.py (Hugging Face Trainer + PEFT LoRA, the same hyperparameter
names), made correct and faster on CPU: every example ends with the tokenizer's EOS (its label is never masked,
even though pad == eos), labels are built explicitly instead of from `input_ids == pad`, the loss is taken on
response tokens only when `train_on_inputs` is false (and the 49k-vocab logits are computed only there),
and with `packing` each micro-batch is one padding-free row with per-example attention (src/alpaca_lora_cpu/packing.py).
Checkpoints every `save_steps` go to a DVC `persist` folder; a rerun resumes from the newest complete one
whose configuration matches. The final eval loss is the token-weighted mean over
the validation responses (prompt tokens never count), so it is comparable across `train_on_inputs` settings.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.checkpoints import FINGERPRINT, check_adapter, find_resume, fingerprint, finished, restore_finished
from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import FinetuneParams, PromptParams, as_dict, load_params
from alpaca_lora_cpu.files import atomic_path, read_jsonl, write_csv, write_text
from alpaca_lora_cpu.launch import check_world, config_file, relaunch, world
from alpaca_lora_cpu.tokenization import encode_all, load_tokenizer
from alpaca_lora_cpu.training import (
    check_bitsandbytes,
    check_targets,
    choose_precision,
    evaluate_responses,
    linear_module_names,
    load_model,
    make_collator,
    mlflow_callback,
    optimizers,
    peak_rss_mb,
    trainer_class,
    training_args,
)

log = logging.getLogger("finetune")


@dataclass(frozen=True)
class Paths:
    base: Path
    data: Path
    out: Path
    checkpoints: Path
    metrics: Path
    plots: Path


# ---------------------------------------------------------------- checks before the model loads


def read_split(path: Path) -> list[dict]:
    return read_jsonl(path, "data split", "run the prepare stage first", records=True)


def check_memory(config, paths: Paths) -> None:
    """On a CPU, refuse (one line) a fine-tune whose base, optimizer state and activations would not fit; on a
    GPU the memory that counts is the GPU's, which the plan does not model."""
    import torch

    from alpaca_lora_cpu.cost import Shape, check_stage

    if not torch.cuda.is_available():
        check_stage("finetune", config, Shape.read(paths.base), paths.data)


def check_inputs(params: FinetuneParams, paths: Paths) -> tuple[list[dict], list[dict]]:
    """Everything that can be wrong with the input, checked before any weights load."""
    train, val = read_split(paths.data / "train.jsonl"), read_split(paths.data / "val.jsonl")  # neither empty
    check_targets(params.lora, linear_module_names(paths.base))
    check_bitsandbytes(params.quantization)
    return train, val


# ---------------------------------------------------------------- outputs


def loss_curve(history: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [{"step": h["step"], "train_loss": h["loss"]} for h in history if "loss" in h]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    return train, evals


def write_plots(folder: Path, train: list[dict], evals: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "train_loss.csv", train, ["step", "train_loss"])
    write_csv(folder / "eval_loss.csv", evals, ["step", "eval_loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train loss")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss (responses)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    png = folder / "loss.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


# ---------------------------------------------------------------- training


def encode_splits(splits: tuple[list, list], tokenizer: Any, params: FinetuneParams, template: str):
    train_records, val_records = splits
    train_set = encode_all(train_records, tokenizer, template, params.cutoff_len, params.train_on_inputs, "train")
    # Eval always masks the prompt: eval loss = loss on responses, comparable across train_on_inputs.
    val_set = encode_all(val_records, tokenizer, template, params.cutoff_len, False, "val")
    return train_set, val_set


def resume_point(params: FinetuneParams, prompt: PromptParams, paths: Paths, is_main: bool) -> str | None:
    """The newest complete checkpoint of this very configuration, or None (fresh start)."""
    expected = fingerprint(params, prompt, paths.data, paths.base)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    resume = find_resume(paths.checkpoints, expected, is_main)
    if is_main:
        write_text(paths.checkpoints / FINGERPRINT, expected + "\n")
    log.info("%s", f"resuming from {resume}" if resume else "training from scratch")
    return resume


def build_trainer(params: FinetuneParams, paths: Paths, tokenizer: Any, datasets: tuple[list, list], mlflow: Any):
    from transformers import set_seed

    set_seed(params.seed)
    model = load_model(paths.base, params)
    collator = make_collator(tokenizer, packing=params.packing)
    trainer = trainer_class()(model=model, args=training_args(params, paths.checkpoints), train_dataset=datasets[0],
                              eval_dataset=datasets[1], data_collator=collator, processing_class=tokenizer,
                              callbacks=[mlflow_callback(mlflow)], optimizers=optimizers(model, params))
    trainer.neftune_alpha = params.neftune_alpha
    return trainer


def train(trainer: Any, resume: str | None) -> tuple[float, float]:
    """(mean training loss, seconds)."""
    t0 = time.time()
    if finished(resume):
        log.info("%s is the last step: nothing left to train", resume)
        return restore_finished(trainer, resume), time.time() - t0
    return trainer.train(resume_from_checkpoint=resume).training_loss, time.time() - t0


def save_outputs(trainer: Any, paths: Paths) -> tuple[dict, list[dict]]:
    """Adapter (checked) and loss plots; checkpoints are dropped, they only serve to resume. (adapter info,
    training-loss curve)."""
    train_curve, eval_curve = loss_curve(trainer.state.log_history)
    with atomic_path(paths.out) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        adapter = check_adapter(tmp)
    write_plots(paths.plots, train_curve, eval_curve)
    for folder in paths.checkpoints.glob("checkpoint-*"):
        shutil.rmtree(folder, ignore_errors=True)
    return adapter, train_curve


def run(params: FinetuneParams, prompt: PromptParams, paths: Paths, splits: tuple[list, list],
        mlflow: Any = None) -> dict | None:
    """Train, save and check the adapter; metrics dict on rank 0, None on other ranks.

    `splits` = check_inputs(params, paths), run by the caller before it opens tracking.
    """
    import torch

    started = time.time()
    rank, world_size = world()
    precision, probe = choose_precision(params.precision, params.bf16_min_speedup, processes=params.processes)
    params = dataclasses.replace(params, precision=precision)  # checkpoints and Trainer see the real choice
    if mlflow is not None:
        mlflow.set_tag("precision", precision)
    tokenizer = load_tokenizer(paths.base)
    train_set, val_set = encode_splits(splits, tokenizer, params, prompt.template)
    resume = resume_point(params, prompt, paths, is_main=rank == 0)
    trainer = build_trainer(params, paths, tokenizer, (train_set, val_set), mlflow)
    mean_loss, train_seconds = train(trainer, resume)
    if rank != 0:
        return None
    # Without accelerate's mixed-precision wrapper: the eval loss is fp32 whatever the training precision, so it
    # compares across precisions (the wrapper would keep running forward under bf16/fp16 autocast).
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    evals = evaluate_responses(model, val_set, trainer.data_collator, params.micro_batch_size)
    # The same responses under the bare base weights: the fine-tune's gain, measured on the same tokens.
    with model.disable_adapter():
        base = evaluate_responses(model, val_set, trainer.data_collator, params.micro_batch_size)
    evals |= {"base_eval_loss": base["eval_loss"], "base_eval_perplexity": base["eval_perplexity"],
              "eval_ppl_ratio": evals["eval_perplexity"] / base["eval_perplexity"]}
    if mlflow is not None:
        mlflow.log_metrics({"eval_loss_final": evals["eval_loss"]}, step=trainer.state.global_step)
    adapter, train_curve = save_outputs(trainer, paths)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    tokens = trainer.train_tokens * world_size  # each process counts its own shard; the shards are equal-sized
    return {
        "final_train_loss": train_curve[-1]["train_loss"] if train_curve else None,
        "mean_train_loss": mean_loss,
        **evals,
        "train_tokens_non_pad": tokens,
        "train_tokens_per_second": tokens / train_seconds if tokens and train_seconds > 0 else None,
        "train_samples": len(train_set),
        "train_samples_seen": trainer.state.global_step * params.batch_size,
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - started,
        "peak_rss_mb": peak_rss_mb(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "processes": world_size,
        "torch_threads": torch.get_num_threads(),
        "precision_bf16": int(precision == "bf16"),
        "precision_fp16": int(precision == "fp16"),
        **probe,
        **adapter,
    }


# The DVC metric (flat numbers, one row of `dvc metrics show`); the whole record goes to finetune.details.json.
METRICS = {"eval_loss": "eval_loss", "ppl": "eval_perplexity"}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "base", "data", "out", "checkpoints", "metrics", "plots", "accelerate_configs")
    args = parse_args(ap, argv)
    config = load_params(args.params)
    params, prompt = config.finetune, config.prompt
    paths = Paths(args.base, args.data, args.out, args.checkpoints, args.metrics, args.plots)
    splits = check_inputs(params, paths)  # bad input stops here, before tracking and weights
    check_memory(config, paths)
    if check_world(params.processes):
        accelerate = config_file(args.accelerate_configs, params.accelerate_config)
        sys.exit(relaunch("stages.finetune", sys.argv[1:] if argv is None else argv, params.processes, accelerate))
    if world()[0] != 0:  # only rank 0 tracks and writes; the other ranks just train
        run(params, prompt, paths, splits)
        return
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("finetune", {"finetune": as_dict(params), "prompt": as_dict(prompt)}) as mlflow:
        metrics = run(params, prompt, paths, splits, mlflow)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
        mlflow.log_artifacts(str(args.out), artifact_path="adapter")
        mlflow.log_artifact(str(args.plots / "loss.png"), artifact_path="plots")
    log.info("adapter → %s: eval loss %.4f (ppl %.2f) after %d steps, %s non-pad tokens/s, %.0f s",
             args.out, metrics["eval_loss"], metrics["eval_perplexity"], metrics["steps"],
             f"{metrics['train_tokens_per_second'] or 0:.1f}", metrics["train_seconds"])


if __name__ == "__main__":
    run_cli(main)
