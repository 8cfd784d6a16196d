"""Prompt templates, and the one function that turns a record into text: `to_turns`.

A record is either an Alpaca record (`instruction`, `input`, `output`) or a conversation (`messages`: a list of
`{"role": "system" | "user" | "assistant", "content": str}`, as alpaca_lora_cpu/records.py normalizes every
`data.format`). `to_turns(record, template, tokenizer)` gives one `Turn` per assistant message: the prompt text
before it and the answer. Training masks the prompts and learns the answers, each followed by EOS; the evaluation
scores the last answer after everything before it (`last_turn`); the gates and calibration read the whole text
(`full_text`). Nothing else reads a record's keys.

Templates (`prompt.template`):
  alpaca  the tutorial's two templates, byte for byte, for single-turn records; a conversation continues with
          `### Instruction:` / `### Response:` blocks, each answer ended by EOS (LLaMA-Factory's alpaca layout),
          and a system message replaces the opening sentence
  chat    the tokenizer's own chat template (for instruct bases such as SmolLM2-Instruct); any object with
          `apply_chat_template` and `eos_token` serves: an HF tokenizer, or a GGUF's template
          (gguf_files.chat_template)
"""
from __future__ import annotations

from dataclasses import dataclass
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
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_NEXT_TURN = "\n\n" + ALPACA_TURN  # after an answer's EOS
RESPONSE_MARKER = "### Response:\n"
TEMPLATES = ("alpaca", "chat")
# A model that writes one of these has started a new Alpaca turn of its own: the answer ended before it.
ALPACA_HEADERS = ("### Instruction:", "### Input:", "### Response:")


@dataclass(frozen=True)
class Turn:
    prompt: str    # the text before an assistant answer (the first turn's includes the template's opening)
    response: str  # the answer; EOS follows it


def render(template: str, instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """The prompt for one instruction (showcase prompts, make generate); `tokenizer` is needed only for `chat`."""
    return to_turns({"instruction": instruction, "input": input, "output": ""}, template, tokenizer)[0].prompt


def to_turns(record: dict, template: str, tokenizer: Any = None) -> list[Turn]:
    """The record as (prompt, answer) turns in `template`; ValueError when it cannot be rendered."""
    if template not in TEMPLATES:
        raise ValueError(f"prompt.template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if "messages" in record:
        messages = record["messages"]
        return _alpaca_turns(messages) if template == "alpaca" else _chat_turns(messages, tokenizer)
    instruction, input_, output = record["instruction"], record.get("input") or "", record["output"]
    if template == "alpaca":
        # Only the constant template is parsed as a format string; braces in the record stay plain text.
        base = ALPACA_WITH_INPUT if input_ else ALPACA_NO_INPUT
        return [Turn(base.format(instruction=instruction, input=input_), output)]
    content = f"{instruction}\n\n{input_}" if input_ else instruction
    return _chat_turns([{"role": "user", "content": content}, {"role": "assistant", "content": output}], tokenizer)


def _alpaca_turns(messages: list[dict]) -> list[Turn]:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    opening = ALPACA_NO_INPUT.split("### Instruction:")[0] if system is None else f"{system}\n\n"
    turns, pending = [], None
    for m in messages:
        if m["role"] == "user":
            pending = m["content"]
        elif m["role"] == "assistant":
            layout = (opening + ALPACA_TURN) if not turns else ALPACA_NEXT_TURN
            turns.append(Turn(layout.format(instruction=pending), m["content"]))
    return turns


def _chat_turns(messages: list[dict], tokenizer: Any) -> list[Turn]:
    """Each prompt is what the chat template adds between the previous answer's EOS and this answer: rendered
    prefixes of the conversation, cut where the last one ended (so every turn is masked exactly)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt.template 'chat' needs a tokenizer with a chat template")
    turns, consumed = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        if not head.startswith(consumed):
            raise ValueError("the chat template does not end an assistant turn with the EOS token "
                             f"({tokenizer.eos_token!r}), so a multi-turn record cannot be split into turns")
        turns.append(Turn(head[len(consumed):], m["content"]))
        consumed = head + m["content"] + tokenizer.eos_token
    return turns


def last_turn(turns: list[Turn], eos_text: str) -> tuple[str, str]:
    """(everything before the last answer, the last answer): what the evaluation scores and generates from."""
    history = "".join(t.prompt + t.response + eos_text for t in turns[:-1])
    return history + turns[-1].prompt, turns[-1].response


def full_text(turns: list[Turn], eos_text: str) -> str:
    """The whole record as text (the gates and the calibration read it), without a final EOS."""
    prompt, response = last_turn(turns, eos_text)
    return prompt + response


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
