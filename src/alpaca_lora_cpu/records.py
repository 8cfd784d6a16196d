"""Instruction records: read them from a local file or the Hugging Face Hub in one of three layouts, validate them,
and normalize them to the two shapes `prompts.to_turns` reads.

`data.format`:
  alpaca    {"instruction", "input" (optional), "output"}                      → kept as is (input "" if absent)
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value"}]}    → {"messages": [...]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content"}]}  → {"messages": [...]}
(the conventions LLaMA-Factory and axolotl users bring; ShareGPT's "user"/"assistant" senders are accepted too).
A conversation is an optional system message, then user and assistant turns alternating, ending with an
assistant answer. Records that break a rule, or duplicate an earlier one, are dropped and counted per reason
(`data.on_invalid: drop`), or stop with a one-line error naming the record and the field (`error`). Offline, a Hub
id falls back to the bundled sample of its layout (data/sample/). Shared by the prepare, imatrix and
bench-finetune entry points.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import read_jsonl
from alpaca_lora_cpu.hub import hub_reachable

log = logging.getLogger("prepare")

FORMATS = ("alpaca", "sharegpt", "messages")
NAMES = {"alpaca": "Alpaca", "sharegpt": "ShareGPT", "messages": "messages"}  # as messages name each layout
FIELDS = ("instruction", "input", "output")
REASONS = ("missing_field", "wrong_type", "empty_output", "bad_roles", "duplicate")
BUNDLED = {"alpaca": Path("data/sample/alpaca_sample.json"), "chat": Path("data/sample/chat_sample.json")}
# Records written for the project that only ever go into the validation split of the offline sample: enough held-out
# records for the report's comparisons to be decided, without changing what the fine-tune trains on.
HELDOUT = {"alpaca": Path("data/sample/alpaca_heldout.json")}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Loaded:
    records: list
    source_used: str
    fallback: bool
    format: str = "alpaca"
    heldout: tuple = ()  # validation-only records (the bundled sample's held-out part)


def bundled_sample(fmt: str) -> Path:
    """The offline sample of a layout: the Alpaca one, or the chat one (in `messages` layout) for both chat layouts."""
    return BUNDLED["alpaca" if fmt == "alpaca" else "chat"]


def _is_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl", ".parquet")) or Path(source).exists()


def read_local(path: Path, fmt: str = "alpaca") -> list:
    if not path.is_file():
        raise StageError(f"data.source {path}: file not found")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return read_jsonl(path, "data.source")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StageError(f"data.source {path}: cannot read ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        raise StageError(f"data.source {path}: cannot read ({type(exc).__name__})") from exc
    if not isinstance(data, list):
        raise StageError(f"data.source {path}: expected a JSON list of {NAMES[fmt]} records, got "
                         f"{type(data).__name__}")
    return data


def _offline_error(exc: BaseException) -> bool:
    """True when `exc` (or its cause chain) says the Hub could not be reached, not that the id is wrong."""
    names = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "OfflineModeIsEnabled",
             "LocalEntryNotFoundError", "ConnectError", "TimeoutException", "gaierror"}
    seen = exc
    while seen is not None:
        if type(seen).__name__ in names or "Couldn't reach" in str(seen) or "offline" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def read_hub(dataset_id: str) -> list:
    import datasets

    ds = datasets.load_dataset(dataset_id, split="train")
    return ds.to_list()


def load_source(source: str, fmt: str = "alpaca") -> Loaded:
    if _is_local(source):
        return Loaded(read_local(Path(source), fmt), source, False, fmt)
    if hub_reachable():
        try:
            return Loaded(read_hub(source), source, False, fmt)
        except Exception as exc:
            if not _offline_error(exc):
                raise StageError(f"data.source {source!r}: cannot load from the Hugging Face Hub "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    sample, layout = bundled_sample(fmt), "alpaca" if fmt == "alpaca" else "messages"
    heldout = HELDOUT.get(fmt)
    log.warning("Hugging Face Hub unreachable for %r: using the bundled sample %s (all of it)%s", source, sample,
                f", and {heldout} for validation only" if heldout else "")
    return Loaded(read_local(sample, layout), str(sample), True, layout,
                  tuple(read_local(heldout, layout)) if heldout else ())


# ---------------------------------------------------------------- one record

Problem = tuple[str, str]  # (reason, field)


def _alpaca(rec: dict) -> dict | Problem:
    for field in ("instruction", "output"):
        if field not in rec or rec[field] is None:
            return "missing_field", field
    for field in FIELDS:
        if field in rec and rec[field] is not None and not isinstance(rec[field], str):
            return "wrong_type", field
    if not rec["output"].strip():
        return "empty_output", "output"
    return {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}


def _conversation(turns: object, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> dict | Problem:
    if turns is None:
        return "missing_field", key
    if not isinstance(turns, list) or not turns:
        return "wrong_type", key
    messages = []
    for i, t in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(t, dict):
            return "wrong_type", where
        if role_key not in t or text_key not in t:
            return "missing_field", f"{where}.{role_key if role_key not in t else text_key}"
        if not isinstance(t[text_key], str) or not isinstance(t[role_key], str):
            return "wrong_type", f"{where}.{text_key}"
        if t[role_key] not in roles:
            return "bad_roles", f"{where}.{role_key}"
        messages.append({"role": roles[t[role_key]], "content": t[text_key]})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or len(body) % 2 or [m["role"] for m in body] != expected[:len(body)]:
        return "bad_roles", key  # user/assistant must alternate, start with user and end with an answer
    if any(not m["content"].strip() for m in body if m["role"] == "assistant"):
        return "empty_output", key
    return {"messages": messages}


def normalize(rec: object, fmt: str) -> dict | Problem:
    """The record in its normalized shape, or (reason, field) when it breaks a rule of `fmt`."""
    if not isinstance(rec, dict):
        return "wrong_type", "record"
    if fmt == "alpaca":
        return _alpaca(rec)
    if fmt == "sharegpt":
        return _conversation(rec.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return _conversation(rec.get("messages"), "messages", "role", "content", {r: r for r in ROLES})


def validate(records: list, fmt: str, on_invalid: str) -> tuple[list[dict], Counter, str | None]:
    """Normalized records, drop counts per reason, and the first problem found (for error messages)."""
    kept: list[dict] = []
    dropped: Counter = Counter({r: 0 for r in REASONS})
    seen: set[str] = set()
    first: str | None = None
    for i, rec in enumerate(records):
        clean = normalize(rec, fmt)
        if isinstance(clean, dict):
            key = json.dumps(clean, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(clean)
                continue
            clean = ("duplicate", "record")
        reason, field = clean
        message = f"record {i}: {reason.replace('_', ' ')} ({field!r})"
        first = first or message
        if on_invalid == "error" and reason != "duplicate":
            raise StageError(f"invalid {NAMES[fmt]} record — {message} (data.on_invalid: error)")
        dropped[reason] += 1
    return kept, dropped, first


def clean(loaded: Loaded, on_invalid: str) -> tuple[list[dict], Counter]:
    """Valid normalized records and drop counts; an error when nothing valid is left."""
    records, dropped, first = validate(loaded.records, loaded.format, on_invalid)
    if not records:
        raise StageError(f"data.source {loaded.source_used}: no valid {NAMES[loaded.format]} records left after "
                         f"validation (first problem: {first or 'the file is empty'})")
    return records, dropped


def clean_heldout(loaded: Loaded, on_invalid: str, seen: list[dict]) -> list[dict]:
    """The validation-only records, validated like the rest, without any that repeat a record of `seen` (a
    held-out record the fine-tune also trains on would not be held out)."""
    if not loaded.heldout:
        return []
    records, _, _ = validate(list(loaded.heldout), loaded.format, on_invalid)
    keys = {json.dumps(r, sort_keys=True) for r in seen}
    return [r for r in records if json.dumps(r, sort_keys=True) not in keys]


def shape_counts(records: list[dict]) -> dict[str, int]:
    """How many records carry an Alpaca `input`, and how many conversations have more than one answer."""
    return {"with_input": sum(bool(r.get("input")) for r in records),
            "multi_turn": sum(sum(m["role"] == "assistant" for m in r.get("messages", [])) > 1 for r in records)}
