"""Records → token ids and labels for training and calibration: one example per record, its prompts masked.

Each turn's prompt and answer are tokenized apart (as at inference, where the prompt is tokenized alone), so
the mask boundary is exact; every answer ends with the tokenizer's EOS, whose label is never masked even though
pad == eos; labels are built explicitly, never from `input_ids == pad`. Used by finetune, imatrix and
bench-finetune; no work at import time.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.prompts import to_turns

log = logging.getLogger("finetune")
IGNORE = -100  # the label the loss skips (transformers' convention)


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


def encode(record: dict, tokenizer: Any, template: str, cutoff_len: int, train_on_inputs: bool) -> dict | None:
    """input_ids / attention_mask / labels for one record: each turn's prompt + answer + EOS, truncated to
    `cutoff_len`. None when nothing would be learned (the prompt alone fills `cutoff_len` and prompt tokens are
    masked)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, turn in enumerate(to_turns(record, template, tokenizer)):
        prompt = tokenizer(turn.prompt, add_special_tokens=i == 0)["input_ids"]
        answer = tokenizer(turn.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids += prompt + answer
        labels += (prompt if train_on_inputs else [IGNORE] * len(prompt)) + answer
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
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
