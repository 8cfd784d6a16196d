"""Alpaca instruction records: read them from a local file or the Hugging Face Hub, and validate them.

A record needs a string `instruction` and `output` (`input` optional). Records with a missing field, a wrong
type, an empty output, or that duplicate an earlier one are dropped and counted per reason (`drop`), or stop
with a one-line error naming the record and the field (`error`). Shared by the prepare stage and
bench-finetune's `--source`.
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


FIELDS = ("instruction", "input", "output")


REASONS = ("missing_field", "wrong_type", "empty_output", "duplicate")


BUNDLED_SAMPLE = Path("data/sample/alpaca_sample.json")


@dataclass(frozen=True)
class Loaded:
    records: list
    source_used: str
    fallback: bool


def _is_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl", ".parquet")) or Path(source).exists()


def read_local(path: Path) -> list:
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
        raise StageError(f"data.source {path}: expected a JSON list of Alpaca records, got {type(data).__name__}")
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


def load_source(source: str) -> Loaded:
    if _is_local(source):
        return Loaded(read_local(Path(source)), source, False)
    if hub_reachable():
        try:
            return Loaded(read_hub(source), source, False)
        except Exception as exc:
            if not _offline_error(exc):
                raise StageError(f"data.source {source!r}: cannot load from the Hugging Face Hub "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    log.warning("Hugging Face Hub unreachable for %r: using the bundled sample %s (all of it)",
                source, BUNDLED_SAMPLE)
    return Loaded(read_local(BUNDLED_SAMPLE), str(BUNDLED_SAMPLE), True)


def check_record(rec: object) -> tuple[str, str] | None:
    """(reason, field) for an invalid record, None for a valid one."""
    if not isinstance(rec, dict):
        return "wrong_type", "record"
    for field in ("instruction", "output"):
        if field not in rec or rec[field] is None:
            return "missing_field", field
    for field in FIELDS:
        if field in rec and rec[field] is not None and not isinstance(rec[field], str):
            return "wrong_type", field
    if not rec["output"].strip():
        return "empty_output", "output"
    return None


def validate(records: list, on_invalid: str) -> tuple[list[dict], Counter, str | None]:
    """Clean records, drop counts per reason, and the first problem found (for error messages)."""
    kept: list[dict] = []
    dropped: Counter = Counter({r: 0 for r in REASONS})
    seen: set[tuple[str, str, str]] = set()
    first: str | None = None
    for i, rec in enumerate(records):
        problem = check_record(rec)
        if problem is None:
            clean = {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}
            key = (clean["instruction"], clean["input"], clean["output"])
            if key in seen:
                problem = ("duplicate", "record")
            else:
                seen.add(key)
                kept.append(clean)
                continue
        reason, field = problem
        message = f"record {i}: {reason.replace('_', ' ')} ({field!r})"
        first = first or message
        if on_invalid == "error" and reason != "duplicate":
            raise StageError(f"invalid Alpaca record — {message} (data.on_invalid: error)")
        dropped[reason] += 1
    return kept, dropped, first


def clean(loaded: Loaded, on_invalid: str) -> tuple[list[dict], Counter]:
    """Valid records and drop counts; an error when nothing valid is left."""
    records, dropped, first = validate(loaded.records, on_invalid)
    if not records:
        raise StageError(f"data.source {loaded.source_used}: no valid Alpaca records left after validation "
                         f"(first problem: {first or 'the file is empty'})")
    return records, dropped
