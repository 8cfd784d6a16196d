"""Judging a fine-tune on data it never saw: a held-out part of a real Alpaca file (records neither the train nor the
val sample touches), scored per record as the finetune stage scores its val split (response tokens + EOS, prompt
masked), and instruction following on the bundled IF prompts (greedy answers, if-verifiable's strict checks).
What `make sweep` (tools/sweep.py) compares recipes by, with the per-record numbers its paired tests resample.

Transformers on the base plus the PEFT adapter (unmerged), fp32, batched greedy generation with left padding.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError


def key(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def pick_heldout(records: list[dict], sampled: list[dict], n: int, seed: int) -> list[dict]:
    """`n` records of `records` (normalized, as prepare cleans them) that are not in `sampled` (the run's train +
    val sample), drawn with `seed`: the same held-out part for every recipe and seed of a study."""
    taken = {key(r) for r in sampled}
    rest = [r for r in records if key(r) not in taken]
    if len(rest) < n:
        raise StageError(f"held-out part: only {len(rest)} records are outside the sample, {n} asked for")
    return random.Random(seed).sample(rest, n)


@dataclass(frozen=True)
class Scores:
    nll: list[float]       # per held-out record: sum of response-token negative log-likelihoods
    tokens: list[int]      # per held-out record: scored tokens
    ifeval: list[list[bool]]  # per IF prompt: strict pass of each of its instructions
    answers: list[str]

    def as_dict(self) -> dict:
        return {"nll": self.nll, "tokens": self.tokens, "ifeval": self.ifeval, "answers": self.answers}


def load(base: Path, adapter: Path | None, threads: int) -> tuple[Any, Any]:
    """(model, tokenizer): the base in fp32 with the adapter applied unmerged (None: the base alone), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from alpaca_lora_cpu.tokenization import load_tokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), load_tokenizer(base)


def record_nll(model: Any, tokenizer: Any, records: list[dict], template: str,
               cutoff_len: int) -> tuple[list[float], list[int]]:
    """Per record: (sum of response-token NLLs, their count), one record a forward. A record whose prompt alone
    fills `cutoff_len` scores (0, 0), as the finetune stage drops it from its val split: the same records drop for
    every model, so the pairing holds, and they weigh nothing in a token-weighted PPL."""
    import torch

    from alpaca_lora_cpu.tokenization import encode
    from alpaca_lora_cpu.training import make_collator, response_loss

    collator = make_collator(tokenizer)
    nll, tokens = [], []
    with torch.inference_mode():
        for record in records:
            example = encode(record, tokenizer, template, cutoff_len, False)
            if example is None:
                nll.append(0.0)
                tokens.append(0)
                continue
            total, n = response_loss(model, collator([example]))
            nll.append(float(total))
            tokens.append(int(n))
    return nll, tokens


def answers(model: Any, tokenizer: Any, instructions: list[str], template: str, max_new_tokens: int,
            batch: int = 16) -> list[str]:
    """Greedy answers, cut at the project's stop sequences (as the evaluate stage cuts them)."""
    import torch

    from alpaca_lora_cpu.prompts import cut_at_stop, render, stop_sequences

    stops = stop_sequences(template, (), end_token=tokenizer.eos_token)
    prompts = [render(template, text, "", tokenizer) for text in instructions]
    out: list[str] = []
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    try:
        with torch.inference_mode():
            for s in range(0, len(prompts), batch):
                enc = tokenizer(prompts[s:s + batch], return_tensors="pt", padding=True)
                gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
                for row in gen[:, enc["input_ids"].shape[1]:]:
                    out.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stops))
    finally:
        tokenizer.padding_side = "right"
    return out


def score(model: Any, tokenizer: Any, records: list[dict], prompts: list[dict], template: str, cutoff_len: int,
          max_new_tokens: int) -> Scores:
    from alpaca_lora_cpu.ifeval import check

    nll, tokens = record_nll(model, tokenizer, records, template, cutoff_len)
    texts = answers(model, tokenizer, [p["prompt"] for p in prompts], template, max_new_tokens)
    return Scores(nll, tokens, [check(t, p)["strict"] for t, p in zip(texts, prompts, strict=True)], texts)
