"""The calibration text of the imatrix and of the -ar levels (AutoRound): `imatrix.source`'s records, each
tokenized as the model was trained on it and cut to `imatrix.chunk_size`, until `imatrix.max_tokens`. Used by
stages/imatrix.py and stages/quantize.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError


def calibration_records(source: str, fmt: str, data: Path) -> tuple[list[dict], Path]:
    """The calibration text (`imatrix.source`) of the imatrix and the -ar levels: (records, the file they came
    from): a prepared split, or a local file read and validated as prepare does."""
    from alpaca_lora_cpu.files import read_jsonl

    if source in ("train", "val"):
        path = data / f"{source}.jsonl"
        return read_jsonl(path, f"{source} split", "run the prepare stage first", records=True), path
    from alpaca_lora_cpu.records import Loaded, clean, read_local

    path = Path(source)
    if not path.is_file():
        raise StageError(f"imatrix.source: {source} is neither train, val nor an existing file")
    records, _ = clean(Loaded(read_local(path, fmt), source, False, fmt), "drop")
    return records, path


def token_sequences(records: list[dict], tokenizer: Any, template: str, params: Any) -> list[list[int]]:
    """Each record as the model was trained on it, cut to chunk_size, until max_tokens in all."""
    from alpaca_lora_cpu.tokenization import encode

    out, total = [], 0
    for record in records:
        try:
            ids = encode(record, tokenizer, template, params.chunk_size, train_on_inputs=True)["input_ids"]
        except ValueError as exc:  # a template that cannot render the record
            raise StageError(f"imatrix: prompt.template {template}: {exc}") from exc
        ids = ids[:params.max_tokens - total]
        if len(ids) < 2:
            break
        out.append(ids)
        total += len(ids)
    if not out:
        raise StageError("imatrix: no calibration tokens (empty source?)")
    return out
