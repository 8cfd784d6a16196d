"""finetune: train a LoRA adapter (optionally 8-bit / 4-bit QLoRA) on data/prepared over models/base.

Run: python -m stages.finetune --params params.yaml --base models/base --data data/prepared \
       --out models/adapter --checkpoints models/checkpoints/finetune \
       --metrics reports/metrics/finetune.json --plots reports/plots/finetune
Distributed (same command, unchanged): accelerate launch --config_file configs/accelerate/ddp.yaml \
       -m stages.finetune --params params.yaml ...

The recipe is tloen/alpaca-lora's finetune.py (Hugging Face Trainer + PEFT LoRA, the same hyperparameter
names), made correct and faster on CPU: every example ends with the tokenizer's EOS (its label is never masked,
even though pad == eos), labels are built explicitly instead of from `input_ids == pad`, the loss is taken on
response tokens only when `train_on_inputs` is false (and the 49k-vocab logits are computed only there),
and with `packing` each micro-batch is one padding-free row with per-example attention (stages/packing.py).
Checkpoints every `save_steps` go to a DVC `persist` folder; a rerun resumes from the newest complete one
whose configuration matches. The final eval loss is the token-weighted mean over
the validation responses (prompt tokens never count), so it is comparable across `train_on_inputs` settings.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.atomic import atomic_path, sha256_file, write_json, write_text
from stages.config import FinetuneParams, LoraParams, PromptParams, as_dict, load_params
from stages.errors import StageError, cli, parse_stage_args, stage_parser
from stages.packing import IGNORE, model_inputs, real_tokens
from stages.packing import collator as packing_collator
from stages.packing import register as register_packed_attention
from stages.prompts import render_record

log = logging.getLogger("finetune")
FINGERPRINT = "fingerprint.json"


@dataclass(frozen=True)
class Paths:
    base: Path
    data: Path
    out: Path
    checkpoints: Path
    metrics: Path
    plots: Path


# ---------------------------------------------------------------- checks before the model loads

def world() -> tuple[int, int]:
    """(rank, world size) as set by `accelerate launch` / torchrun; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def linear_module_names(base: Path) -> list[str]:
    """Short names of the model's nn.Linear modules (q_proj, …), from a weightless (meta-device) instance."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (base / "config.json").is_file():
        raise StageError(f"base model folder {base} has no config.json (run the base stage first)")
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_layer = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and mod is not out_layer})


def check_targets(lora: LoraParams, available: list[str]) -> None:
    if lora.target_modules == "all-linear":
        return
    unknown = [m for m in lora.target_modules if m not in available]
    if unknown:
        raise StageError(f"finetune.lora.target_modules: the model has no linear module {unknown[0]!r} "
                         f"(its linear modules: {', '.join(available)}; or use 'all-linear')")


def check_bitsandbytes(quantization: str) -> None:
    """8bit/4bit need a bitsandbytes that can quantize on this device: try a tiny tensor, not the model."""
    if quantization == "none":
        return
    try:
        import bitsandbytes.functional as bnbf
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        sample = torch.randn(64, 64, device=device)
        if quantization == "4bit":
            bnbf.quantize_4bit(sample, quant_type="nf4")
        else:
            bnbf.int8_vectorwise_quant(sample.half() if device == "cuda" else sample)
    except Exception as exc:  # ImportError, missing native library, unsupported device: all mean "unusable"
        raise StageError(f"finetune.quantization {quantization} needs a working bitsandbytes, which is unusable "
                         f"here ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                         "set finetune.quantization: none") from exc


def read_split(path: Path) -> list[dict]:
    if not path.is_file():
        raise StageError(f"{path} not found (run the prepare stage first)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise StageError(f"{path}: line {i + 1} is not valid JSON ({exc.msg})") from exc
    return rows


def preflight(params: FinetuneParams, paths: Paths) -> tuple[list[dict], list[dict]]:
    """Everything that can be wrong with the input, checked before any weights load."""
    _, world_size = world()
    if params.batch_size % (params.micro_batch_size * world_size):
        raise StageError(f"finetune.batch_size ({params.batch_size}) must be a multiple of micro_batch_size × "
                         f"processes ({params.micro_batch_size} × {world_size})")
    train, val = read_split(paths.data / "train.jsonl"), read_split(paths.data / "val.jsonl")
    if not train:
        raise StageError(f"{paths.data / 'train.jsonl'}: the training split is empty")
    if not val:
        raise StageError(f"{paths.data / 'val.jsonl'}: the validation split is empty")
    check_targets(params.lora, linear_module_names(paths.base))
    check_bitsandbytes(params.quantization)
    return train, val


# ---------------------------------------------------------------- tokenization and batching

def encode(record: dict, tokenizer: Any, template: str, cutoff_len: int, train_on_inputs: bool) -> dict | None:
    """input_ids / attention_mask / labels for one record: prompt + output + EOS, truncated to `cutoff_len`.

    Prompt and response are tokenized separately (as at inference, where the prompt is tokenized alone) so
    the mask boundary is exact. Labels are set explicitly: the EOS label stays even though pad == eos.
    None when nothing would be learned (the prompt alone fills `cutoff_len` and prompt tokens are masked).
    """
    prompt_ids = tokenizer(render_record(template, record, tokenizer), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    n_prompt = min(len(prompt_ids), len(input_ids))
    labels = list(input_ids) if train_on_inputs else [IGNORE] * n_prompt + input_ids[n_prompt:]
    if all(x == IGNORE for x in labels[1:]):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_all(records: list[dict], tokenizer: Any, template: str, cutoff_len: int,
               train_on_inputs: bool, split: str) -> list[dict]:
    encoded = [encode(r, tokenizer, template, cutoff_len, train_on_inputs) for r in records]
    kept = [e for e in encoded if e is not None]
    if len(kept) < len(encoded):
        log.warning("%s: %d record(s) dropped: the prompt alone fills finetune.cutoff_len=%d",
                    split, len(encoded) - len(kept), cutoff_len)
    if not kept:
        raise StageError(f"{split}: no record fits finetune.cutoff_len={cutoff_len} with room for a response")
    return kept


def make_collator(tokenizer: Any, pad_to_multiple_of: int | None = None, packing: bool = False):
    """Packed rows (stages/packing.py), or right-padding with the pad token and labels padded with -100
    (never derived from input_ids == pad)."""
    from transformers import DataCollatorForSeq2Seq

    if packing:
        return packing_collator()

    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE, return_tensors="pt")


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.eos_token_id is None:
        raise StageError(f"tokenizer in {base} has no EOS token")
    if tokenizer.pad_token_id is None:
        # Explicit pad; sharing EOS is safe because labels never come from input_ids == pad.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ---------------------------------------------------------------- loss on labelled positions only

def response_loss(model: Any, batch: dict) -> tuple[Any, Any]:
    """(sum of token cross-entropies, number of labelled tokens); logits only where a label exists.

    The 49k-vocab projection and its softmax are a large share of a small model's step: with prompt tokens
    and padding masked there is no reason to compute them there.
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t+1
    out = model(**model_inputs(batch), logits_to_keep=keep)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    targets = labels[:, 1:][keep[:, :-1]]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()


def evaluate_responses(model: Any, examples: list[dict], collator: Any, batch_size: int) -> dict:
    """Token-weighted mean loss over response tokens (examples encoded with the prompt masked)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collator(examples[i:i + batch_size])
            # Packed batches also carry plain ints (max_length_q/k).
            batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
            loss_sum, n = response_loss(model, batch)
            total, count = total + float(loss_sum), count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def trainer_class():
    """Trainer with the response-only loss and a count of non-pad training tokens (built lazily: heavy import)."""
    from transformers import Trainer

    class FinetuneTrainer(Trainer):
        train_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.train_tokens += real_tokens(inputs)
            loss_sum, count = response_loss(model, inputs)
            # Normalise by the labelled tokens of the whole accumulated batch when the Trainer counted them
            # (exact gradient accumulation), else by this micro-batch's.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else max(count, 1))
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
            return (loss, {}) if return_outputs else loss

    return FinetuneTrainer


# ---------------------------------------------------------------- model

def load_model(base: Path, params: FinetuneParams):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[params.precision]
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if params.quantization != "none":
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if params.quantization == "8bit" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local if torch.cuda.is_available() else "cpu"}
    if params.packing:
        kwargs["attn_implementation"] = register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if params.quantization != "none":
        # Gradient checkpointing trades compute for memory; the models here fit, so keep the compute.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = params.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        task_type="CAUSAL_LM",
                        target_modules=lora.target_modules if isinstance(lora.target_modules, str)
                        else list(lora.target_modules))
    return get_peft_model(model, config)


# ---------------------------------------------------------------- checkpoints

def fingerprint(params: FinetuneParams, prompt: PromptParams, paths: Paths) -> str:
    """What a checkpoint must match to be resumed: params, data, base weights and the process count."""
    digest = hashlib.sha256(json.dumps({"finetune": as_dict(params), "prompt": as_dict(prompt),
                                        "world": world()[1]}, sort_keys=True).encode())
    for f in sorted(paths.data.glob("*.jsonl")) + [paths.base / "config.json"]:
        digest.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    for f in sorted(paths.base.glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()


def checkpoint_ok(folder: Path) -> str | None:
    """None if `folder` is a complete Trainer checkpoint, else what is wrong with it."""
    from safetensors import safe_open

    step = int(folder.name.rsplit("-", 1)[1])
    need = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
            "scheduler.pt")
    missing = [n for n in need if not (folder / n).is_file() or (folder / n).stat().st_size == 0]
    if missing:
        return f"missing or empty {missing[0]}"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
            if not list(fh.keys()):
                return "adapter has no tensors"
    except Exception as exc:  # truncated JSON / safetensors header: a partial write
        return f"unreadable ({type(exc).__name__})"
    if state.get("global_step") != step:
        return f"trainer_state.json says step {state.get('global_step')}"
    return None


def finished(checkpoint: str | None) -> bool:
    """True when `checkpoint` is the run's last step (killed after saving it, before the adapter was written).

    The Trainer would resume such a checkpoint with one step too many: it checks `max_steps` only after a step.
    """
    if checkpoint is None:
        return False
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]


def restore_finished(trainer: Any, checkpoint: str) -> float:
    """Load a finished checkpoint's adapter and Trainer state instead of training; returns the mean train loss."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else float("nan")


def find_resume(ckpt_dir: Path, expected: str, is_main: bool) -> str | None:
    """Newest complete checkpoint made with the same configuration; partial ones are skipped (and removed)."""
    found = ckpt_dir / FINGERPRINT
    folders = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                     key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    if folders and (not found.is_file() or found.read_text().strip() != expected):
        log.warning("checkpoints in %s come from another configuration (params, data or base changed): "
                    "starting from scratch", ckpt_dir)
        if is_main:
            for p in folders:
                shutil.rmtree(p, ignore_errors=True)
        return None
    for folder in folders:
        problem = checkpoint_ok(folder)
        if problem is None:
            return str(folder)
        log.warning("skipping incomplete checkpoint %s: %s", folder, problem)
        if is_main:
            shutil.rmtree(folder, ignore_errors=True)
    return None


# ---------------------------------------------------------------- outputs

def check_adapter(folder: Path) -> dict:
    """The saved adapter loads, has LoRA tensors, and training moved it (PEFT initialises lora_B to zeros)."""
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file() or not (folder / "adapter_config.json").is_file():
        raise StageError(f"internal: {folder} lacks adapter_model.safetensors or adapter_config.json")
    tensors = load_file(str(weights))
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    if not tensors or not lora_b:
        raise StageError(f"internal: {weights} holds no LoRA tensors ({len(tensors)} tensors)")
    moved = max(float(t.abs().max()) for t in lora_b)
    if moved == 0.0:
        raise StageError(f"internal: {weights} equals its initialisation (all lora_B are zero): nothing was learned")
    return {"adapter_tensors": len(tensors), "adapter_bytes": weights.stat().st_size,
            "adapter_parameters": sum(t.numel() for t in tensors.values()), "adapter_max_abs_lora_b": moved}


def loss_curve(history: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [{"step": h["step"], "train_loss": h["loss"]} for h in history if "loss" in h]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    return train, evals


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- training

def mlflow_callback(mlflow: Any):
    """Per-step loss / learning rate / eval loss into the stage's own MLflow run (rank 0 only).

    The Trainer's MLflow integration would start a second run and clash with the one `stage_run` holds open
    ("Run already active"), so `report_to` is empty and this callback logs instead.
    """
    from transformers import TrainerCallback

    class MlflowSteps(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if mlflow is None or not state.is_world_process_zero or not logs:
                return
            keys = ("loss", "learning_rate", "grad_norm", "eval_loss")
            values = {("train_loss" if k == "loss" else k): float(v) for k, v in logs.items() if k in keys}
            if values:
                mlflow.log_metrics(values, step=state.global_step)

    return MlflowSteps()


def training_args(params: FinetuneParams, ckpt_dir: Path):
    import torch
    from transformers import TrainingArguments

    _, world_size = world()
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=params.micro_batch_size,
        per_device_eval_batch_size=params.micro_batch_size,
        gradient_accumulation_steps=params.batch_size // (params.micro_batch_size * world_size),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps or -1,
        learning_rate=params.learning_rate,
        warmup_steps=params.warmup_steps,
        lr_scheduler_type="linear",  # alpaca-lora: Trainer default, linear decay after warm-up
        optim="adamw_torch",
        weight_decay=0.0,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=params.eval_steps,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=2,  # the newest plus one older, in case the newest was cut off mid-write
        bf16=params.precision == "bf16",
        fp16=params.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=params.seed,
        data_seed=params.seed,
        train_sampling_strategy="group_by_length" if params.group_by_length else "random",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
        disable_tqdm=False,
    )


def run(params: FinetuneParams, prompt: PromptParams, paths: Paths, splits: tuple[list, list],
        mlflow: Any = None) -> dict | None:
    """Train, save and check the adapter; metrics dict on rank 0, None on other ranks.

    `splits` = preflight(params, paths), run by the caller before it opens tracking.
    """
    started = time.time()
    rank, world_size = world()
    is_main = rank == 0
    train_records, val_records = splits
    tokenizer = load_tokenizer(paths.base)
    train_set = encode_all(train_records, tokenizer, prompt.template, params.cutoff_len,
                           params.train_on_inputs, "train")
    # Eval always masks the prompt: eval loss = loss on responses, comparable across train_on_inputs.
    val_set = encode_all(val_records, tokenizer, prompt.template, params.cutoff_len, False, "val")

    expected = fingerprint(params, prompt, paths)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    resume = find_resume(paths.checkpoints, expected, is_main)
    if is_main:
        write_text(paths.checkpoints / FINGERPRINT, expected + "\n")
    log.info("%s", f"resuming from {resume}" if resume else "training from scratch")

    import torch
    from transformers import set_seed

    set_seed(params.seed)
    model = load_model(paths.base, params)
    trainable, total = model.get_nb_trainable_parameters()
    collator = make_collator(tokenizer, packing=params.packing)
    trainer = trainer_class()(model=model, args=training_args(params, paths.checkpoints),
                              train_dataset=train_set, eval_dataset=val_set, data_collator=collator,
                              processing_class=tokenizer, callbacks=[mlflow_callback(mlflow)])
    t0 = time.time()
    if finished(resume):
        log.info("%s is the last step: nothing left to train", resume)
        mean_loss = restore_finished(trainer, resume)
    else:
        mean_loss = trainer.train(resume_from_checkpoint=resume).training_loss
    train_seconds = time.time() - t0
    if not is_main:
        return None

    evals = evaluate_responses(trainer.model, val_set, collator, params.micro_batch_size)
    history = trainer.state.log_history
    if mlflow is not None:
        mlflow.log_metrics({"eval_loss_final": evals["eval_loss"]}, step=trainer.state.global_step)
    train_curve, eval_curve = loss_curve(history)
    with atomic_path(paths.out) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        adapter = check_adapter(tmp)
    write_plots(paths.plots, train_curve, eval_curve)
    # The adapter is the result; checkpoints only serve to resume an interrupted run.
    for folder in paths.checkpoints.glob("checkpoint-*"):
        shutil.rmtree(folder, ignore_errors=True)
    tokens = trainer.train_tokens * world_size  # each process counts its own shard; the shards are equal-sized
    metrics = {
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
        **adapter,
    }
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser(__doc__, "base", "data", "out", "checkpoints", "metrics", "plots")
    args = parse_stage_args(ap, argv)
    config = load_params(args.params)
    params, prompt = config.finetune, config.prompt
    paths = Paths(args.base, args.data, args.out, args.checkpoints, args.metrics, args.plots)
    splits = preflight(params, paths)  # bad input stops here, before tracking and weights
    if world()[0] != 0:  # only rank 0 tracks and writes; the other ranks just train
        run(params, prompt, paths, splits)
        return
    from stages.tracking import log_metrics, stage_run

    with stage_run("finetune", {"finetune": as_dict(params), "prompt": as_dict(prompt)}) as mlflow:
        metrics = run(params, prompt, paths, splits, mlflow)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
        mlflow.log_artifacts(str(args.out), artifact_path="adapter")
        mlflow.log_artifact(str(args.plots / "loss.png"), artifact_path="plots")
    log.info("adapter → %s: eval loss %.4f (ppl %.2f) after %d steps, %s non-pad tokens/s, %.0f s",
             args.out, metrics["eval_loss"], metrics["eval_perplexity"], metrics["steps"],
             f"{metrics['train_tokens_per_second'] or 0:.1f}", metrics["train_seconds"])


if __name__ == "__main__":
    cli(main)
