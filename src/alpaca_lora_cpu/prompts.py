"""Prompt templates shared by training, evaluation and generation.

`alpaca` is the tutorial's two templates, byte for byte; `chat` renders the tokenizer's own chat template
(for instruct bases such as SmolLM2-Instruct). Both return the prompt only: the response (and EOS) is what
the model learns to produce after it.
"""
from __future__ import annotations

from typing import Any

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_MARKER = "### Response:\n"


def render(template: str, instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """The prompt for one record; `tokenizer` is needed only for `chat`."""
    if template == "alpaca":
        # Only the constant template is parsed as a format string; braces in the record stay plain text.
        base = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
        return base.format(instruction=instruction, input=input)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt.template 'chat' needs a tokenizer with a chat template")
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"prompt.template must be alpaca or chat, got {template!r}")


def render_record(template: str, record: dict, tokenizer: Any = None) -> str:
    return render(template, record["instruction"], record.get("input") or "", tokenizer)


# A model that writes one of these has started a new Alpaca turn of its own: the answer ended before it.
ALPACA_HEADERS = ("### Instruction:", "### Input:", "### Response:")


def stop_sequences(template: str, extra: tuple[str, ...] | list[str] = (), end_token: str | None = None) -> list[str]:
    """Where an answer ends besides EOS: the Alpaca headers, or for `chat` the template's end-of-turn token;
    then `generate.stop` from params.yaml. Used by generate, chat, serve, the evaluation and the Modelfile."""
    base = list(ALPACA_HEADERS) if template == "alpaca" else [end_token] if end_token else []
    return list(dict.fromkeys([*base, *extra]))


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the first stop sequence, as a generator with these stops would have returned it."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def leaks_template(text: str) -> bool:
    """The answer writes an Alpaca header, i.e. runs on into a turn nobody asked for."""
    return any(h in text for h in ALPACA_HEADERS)
