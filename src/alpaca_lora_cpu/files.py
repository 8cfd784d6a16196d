"""Atomic outputs: write to a temporary sibling, then `os.replace`, so a crash never leaves a half-written file.

A reader (the next stage, DVC's cache) sees either the old complete output or the new complete output.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError


def ensure_writable(*outputs: str | os.PathLike) -> None:
    """Fail before any work if an output's folder could not be created or written; creates nothing."""
    for out in outputs:
        parent = Path(out).absolute().parent
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        if not existing.is_dir():
            raise StageError(f"cannot create output folder {parent}: {existing} is not a folder")
        if not os.access(existing, os.W_OK):
            raise StageError(f"output folder {existing} is not writable")


def _make_parent(parent: Path) -> None:
    ensure_writable(parent / "_")
    parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path for a file or folder; move it onto `path` only if the block succeeds."""
    target = Path(path)
    _make_parent(target.parent)
    # Staging copies left by a killed run are garbage (DVC's lock rules out a concurrent writer): clear them.
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if not staged.exists():
            raise StageError(f"internal: nothing was written for {target}")
        if staged.is_dir() and target.is_dir():
            # Directories cannot be replaced in one rename: park the old one, swap, then delete it.
            old = tmp / ".old"
            os.replace(target, old)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def details_path(metrics_path: str | os.PathLike) -> Path:
    """The detail JSON beside a stage's metrics JSON (`q4_0.json` → `q4_0.details.json`): the stage's whole record
    (strings, hashes, environment, nested checks), while the metrics file keeps a few flat numbers for DVC."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}.details{p.suffix}")


def read_details(metrics_path: str | os.PathLike, what: str = "file", hint: str = "") -> Any:
    """A stage's whole record, read from the detail JSON beside its metrics file."""
    return read_json(details_path(metrics_path), what, hint)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files (e.g. weight shards), in the order given."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode())
        digest.update(bytes.fromhex(sha256_file(p)))
    return digest.hexdigest()


def write_csv(path: str | os.PathLike, rows: list[dict], fields: list[str]) -> None:
    """A CSV with a header row (the DVC plot format), written atomically."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _read_text(path: Path, what: str, hint: str) -> str:
    if not path.is_file():
        raise StageError(f"{what} {path} not found" + (f" ({hint})" if hint else ""))
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StageError(f"{what} {path}: cannot read ({type(exc).__name__})") from exc


def read_json(path: str | os.PathLike, what: str = "file", hint: str = "") -> Any:
    """One JSON document; a missing or malformed file is a one-line StageError naming `what` and the path."""
    p = Path(path)
    try:
        return json.loads(_read_text(p, what, hint))
    except json.JSONDecodeError as exc:
        raise StageError(f"{what} {p} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc


def read_jsonl(path: str | os.PathLike, what: str = "file", hint: str = "", records: bool = False) -> list:
    """The rows of a JSON Lines file (blank lines skipped); a bad line is a one-line StageError naming it.
    `records`: a data split, which must hold at least one row, each a JSON object."""
    p = Path(path)
    rows = []
    for i, line in enumerate(_read_text(p, what, hint).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise StageError(f"{what} {p}: cannot read line {i}: not valid JSON ({exc.msg})") from exc
            if records and not isinstance(rows[-1], dict):
                raise StageError(f"{what} {p}: line {i} is a JSON {type(rows[-1]).__name__}, not a record")
    if records and not rows:
        raise StageError(f"{what} {p} holds no records" + (f" ({hint})" if hint else ""))
    return rows
