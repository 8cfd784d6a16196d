"""LoRA training on Hugging Face Trainer + PEFT, the pieces the finetune stage and bench-finetune share: checks
before the model loads, collators (padded or packed), the model with its LoRA adapter, the response-only loss,
the Trainer class and its arguments. Examples come from alpaca_lora_cpu/tokenization.py.

With `train_on_inputs` false the loss (and the 49k-vocab logits) are computed on response tokens only. No work at
import time: torch and transformers load inside functions.
"""
from __future__ import annotations

import logging
import math
import os
import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.config import FinetuneParams, LoraParams
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.launch import world
from alpaca_lora_cpu.packing import collator as packing_collator
from alpaca_lora_cpu.packing import is_packed, model_inputs, real_tokens
from alpaca_lora_cpu.packing import register as register_packed_attention
from alpaca_lora_cpu.tokenization import IGNORE

log = logging.getLogger("finetune")


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


def make_collator(tokenizer: Any, pad_to_multiple_of: int | None = None, packing: bool = False):
    """Packed rows (src/alpaca_lora_cpu/packing.py), or right-padding with the pad token and labels padded with -100
    (never derived from input_ids == pad)."""
    from transformers import DataCollatorForSeq2Seq

    if packing:
        return packing_collator()

    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE, return_tensors="pt")


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


def example_lengths(batch: dict, shape: tuple[int, int]) -> Any:
    """(rows, positions): the length of the example each position belongs to; 0 for padding. A packed row holds
    several examples (`cu_seq_lens_q` boundaries); a padded row one (its attention mask's sum)."""
    import torch

    if is_packed(batch):
        bounds = batch["cu_seq_lens_q"].to(torch.long)
        sizes = bounds[1:] - bounds[:-1]
        return torch.repeat_interleave(sizes, sizes).reshape(shape).to(torch.float32)
    mask = batch["attention_mask"].to(torch.float32)
    return mask * mask.sum(dim=1, keepdim=True)


def neftune_noise(embeds: Any, lengths: Any, alpha: float) -> Any:
    """NEFTune (Jain et al. 2023): embeddings + Uniform(-1, 1) · alpha / √(L·d), L the example's own length."""
    import torch

    d = embeds.shape[-1]
    scale = torch.where(lengths > 0, alpha / torch.sqrt(lengths.clamp(min=1) * d), 0.0).to(embeds.dtype)
    return embeds + (torch.rand_like(embeds) * 2 - 1) * scale[..., None]


@contextmanager
def neftune(model: Any, batch: dict, alpha: float | None):
    """Noise on the input embeddings for the forward passes inside (training only; off when alpha is None)."""
    if alpha is None or not model.training:
        yield
        return
    lengths = example_lengths(batch, tuple(batch["input_ids"].shape))
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _module, _args, output: neftune_noise(output, lengths.to(output.device), alpha))
    try:
        yield
    finally:
        handle.remove()


def trainer_class():
    """Trainer with the response-only loss, optional NEFTune noise and a count of non-pad training tokens (built
    lazily: heavy import)."""
    from transformers import Trainer

    class FinetuneTrainer(Trainer):
        train_tokens = 0
        neftune_alpha: float | None = None  # the project's per-example NEFTune, not TrainingArguments' own

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.train_tokens += real_tokens(inputs)
            with neftune(model, inputs, self.neftune_alpha):
                loss_sum, count = response_loss(model, inputs)
            # Normalise by the labelled tokens of the whole accumulated batch when the Trainer counted them
            # (exact gradient accumulation), else by this micro-batch's.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else max(count, 1))
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
            return (loss, {}) if return_outputs else loss

    return FinetuneTrainer


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
                        task_type="CAUSAL_LM", use_rslora=lora.use_rslora,
                        target_modules=lora.target_modules if isinstance(lora.target_modules, str)
                        else list(lora.target_modules))
    return get_peft_model(model, config)


def optimizers(model: Any, params: FinetuneParams) -> tuple[Any, None]:
    """The Trainer's (optimizer, scheduler): its own AdamW (None), or LoRA+'s AdamW with lora_B at
    `loraplus_lr_ratio` × the learning rate (PEFT's create_loraplus_optimizer); the Trainer adds the schedule."""
    if params.loraplus_lr_ratio is None:
        return None, None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=params.learning_rate,
                                     loraplus_lr_ratio=params.loraplus_lr_ratio, weight_decay=0.0), None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


def matmul_gflops(dtype_name: str, rows: int = 1024, inner: int = 576, cols: int = 1536, repeats: int = 5) -> float:
    """GFLOP/s of a training-shaped matmul (tokens × hidden @ hidden × MLP width, SmolLM2-135M's shapes) in one
    dtype: the best of `repeats` after a warm-up, so a busy core costs a run, not the answer."""
    import time

    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * inner * cols / best / 1e9


def choose_precision(requested: str, min_speedup: float, cuda: bool | None = None,
                     bf16_on_cuda: bool | None = None, probe=matmul_gflops, processes: int | None = None,
                     ) -> tuple[str, dict]:
    """(precision to train in, what the choice rests on). `auto` on CUDA: bf16 where the GPU supports it, else
    fp16. On CPU, bf16 is native on some CPUs (AMX, avx512_bf16) and emulated, tens of times slower, on others,
    so `auto` measures instead of guessing: bf16 autocast only if its matmul is at least `min_speedup` × fp32."""
    if requested != "auto":
        return requested, {}
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        supported = torch.cuda.is_bf16_supported() if bf16_on_cuda is None else bf16_on_cuda
        return ("bf16" if supported else "fp16"), {"precision_probe_cuda": 1}
    if (processes or world()[1]) > 1:
        # Each process would time its own probe and could decide differently; they must train alike.
        log.info("precision auto with several CPU processes: fp32 (set finetune.precision to choose bf16)")
        return "fp32", {"precision_probe_cuda": 0}
    fp32, bf16 = probe("fp32"), probe("bf16")
    chosen = "bf16" if bf16 >= min_speedup * fp32 else "fp32"
    log.info("precision auto: bf16 matmul %.0f GFLOP/s vs fp32 %.0f (%.2fx, threshold %.2fx) → %s",
             bf16, fp32, bf16 / fp32, min_speedup, chosen)
    return chosen, {"precision_probe_cuda": 0, "precision_probe_fp32_gflops": fp32,
                    "precision_probe_bf16_gflops": bf16, "precision_probe_bf16_speedup": bf16 / fp32}
