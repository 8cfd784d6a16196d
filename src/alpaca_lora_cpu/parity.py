"""Parity checks shared by the export gates: the validation texts, HF logits, and how two sets of logits compare.

Gate texts are the first N validation records rendered whole with the training template (prompts.full_text), so
every gate looks at prompt tokens and response tokens alike.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import read_jsonl
from alpaca_lora_cpu.metrics import log_probs
from alpaca_lora_cpu.prompts import full_text, to_turns


class GateFailure(StageError):
    """A broken gate: the metrics (with the failure) are still written, the stage's output is not."""

    def __init__(self, metrics: dict, message: str):
        super().__init__(message)
        self.metrics = metrics


def run_gated(mlflow: Any, metrics_path: Path, keys: dict[str, str], work: Callable[[], dict]) -> dict:
    """Run a gated stage's work; its metrics (`keys`: see tracking.headline), details JSON and MLflow get the
    result, or the failed gates. Keys a record lacks (a skipped stage, a gate that failed early) are left out."""
    from alpaca_lora_cpu.tracking import write_stage_metrics

    try:
        metrics = work()
    except GateFailure as exc:
        write_stage_metrics(mlflow, metrics_path, exc.metrics, keys, strict=False)
        raise
    write_stage_metrics(mlflow, metrics_path, metrics, keys, strict=False)
    return metrics


def gate_texts(val_path: str | Path, n: int, template: str, tokenizer: Any = None) -> list[str]:
    path = Path(val_path)
    rows = read_jsonl(path, "validation file", records=True)
    if not rows:
        raise StageError(f"validation file {path} has no records")
    eos = getattr(tokenizer, "eos_token", None) or ""
    try:
        return [full_text(to_turns(r, template, tokenizer), eos) for r in rows[:n]]
    except (KeyError, TypeError, ValueError) as exc:
        raise StageError(f"validation file {path}: cannot render a gate text with prompt.template {template} "
                         f"({type(exc).__name__}: {exc})") from exc


def hf_token_ids(tokenizer: Any, texts: list[str], max_tokens: int) -> list[list[int]]:
    return [tokenizer(t)["input_ids"][:max_tokens] for t in texts]


def compare(ref: list[np.ndarray], got: list[np.ndarray], ids: list[list[int]]) -> dict:
    """max |Δlogit|, top-1 agreement over all positions, and mean |Δ log-prob| of the actual next tokens."""
    max_diff, agree, positions, dlp = 0.0, 0, 0, []
    for r, g, seq in zip(ref, got, ids, strict=True):
        if r.shape != g.shape:
            raise StageError(f"logit shapes differ: {r.shape} vs {g.shape}")
        max_diff = max(max_diff, float(np.abs(r - g).max()))
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        positions += r.shape[0]
        nxt = np.array(seq[1:])
        if len(nxt):
            rows = np.arange(len(nxt))
            dlp.append(np.abs(log_probs(r[:-1])[rows, nxt] - log_probs(g[:-1])[rows, nxt]))
    return {
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / positions,
        "mean_abs_logprob_diff": float(np.concatenate(dlp).mean()) if dlp else 0.0,
        "positions": positions,
        "sequences": len(ids),
    }
