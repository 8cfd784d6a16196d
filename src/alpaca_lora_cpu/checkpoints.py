"""Resumable training: which Trainer checkpoint to resume from, and whether a saved adapter is real.

Checkpoints carry a fingerprint of the params, the data and the base model; a checkpoint from another
configuration is never resumed. A partial or corrupt checkpoint (missing files, truncated JSON or
safetensors, a step mismatch) is skipped with a warning. A run stopped after its last checkpoint is finished
from it without training again (the Trainer alone would take one step more than `max_steps`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.config import FinetuneParams, PromptParams, as_dict
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import sha256_file
from alpaca_lora_cpu.launch import world

log = logging.getLogger("finetune")


FINGERPRINT = "fingerprint.json"


def fingerprint(params: FinetuneParams, prompt: PromptParams, data: Path, base: Path) -> str:
    """What a checkpoint must match to be resumed: params, data, base weights and the process count."""
    digest = hashlib.sha256(json.dumps({"finetune": as_dict(params), "prompt": as_dict(prompt),
                                        "world": world()[1]}, sort_keys=True).encode())
    for f in sorted(data.glob("*.jsonl")) + [base / "config.json"]:
        digest.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    for f in sorted(base.glob("*.safetensors")):
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
