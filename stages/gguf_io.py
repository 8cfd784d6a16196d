"""GGUF files, safely: validate before llama.cpp sees them, open with llama-cpp-python, read logits and tensor types.

Shared by convert, quantize, evaluate and generate/serve. llama.cpp aborts or segfaults on some malformed files,
so every path here goes through `check_gguf` first (magic, a header the `gguf` package can parse, every tensor's
data inside the file); problems become a one-line `StageError`.

    with open_llama(path, n_ctx=512, logits_all=True) as llm:
        ids = tokenize(llm, text)
        logits = all_logits(llm, ids)      # (len(ids), vocab) float32, one row per position
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stages.errors import StageError
from stages.native import preflight

MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str          # GGML type name as stored, e.g. "Q4_K", "F32"
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length (ncols)
    n_elements: int
    n_bytes: int


def check_gguf(path: str | os.PathLike) -> Any:
    """Return a `gguf.GGUFReader` for `path`, or raise StageError if it is not a complete GGUF file."""
    p = Path(path)
    if not p.is_file():
        raise StageError(f"GGUF file {p} not found")
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head != MAGIC:
        raise StageError(f"{p} is not a GGUF file (starts with {head!r}, expected {MAGIC!r})")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(p)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on a cut header
        raise StageError(f"{p} is a damaged GGUF file: cannot read its header "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from exc
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise StageError(f"{p} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,} "
                             f"but the file has {size:,} bytes")
    if not reader.tensors:
        raise StageError(f"{p} holds no tensors (vocab-only GGUF?)")
    return reader


def field_value(reader: Any, key: str) -> Any:
    """A scalar or string metadata value, or None when absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types and field.types[0].name == "STRING" else part.tolist()[0]


def tensor_infos(reader_or_path: Any) -> list[TensorInfo]:
    reader = check_gguf(reader_or_path) if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path
    return [TensorInfo(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_elements),
                       int(t.n_bytes)) for t in reader.tensors]


def type_counts(infos: list[TensorInfo]) -> dict[str, int]:
    return dict(sorted(Counter(t.type for t in infos).items()))


def bits_per_weight(infos: list[TensorInfo]) -> float:
    """Stored bits per parameter over all tensors (what llama.cpp reports as BPW)."""
    return 8 * sum(t.n_bytes for t in infos) / sum(t.n_elements for t in infos)


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (where llama.cpp's C code logs) to a temp file; yields a list filled on exit."""
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


@contextlib.contextmanager
def open_llama(path: str | os.PathLike, n_ctx: int = 512, logits_all: bool = False,
               n_threads: int | None = None, **kwargs: Any) -> Iterator[Any]:
    """A `llama_cpp.Llama` on a validated GGUF, tried in a child first (`native.preflight`), closed on exit
    (no noisy __del__ at interpreter exit)."""
    check_gguf(path)
    preflight(path)
    import llama_cpp

    with captured_stderr() as log:
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                                  n_threads=n_threads or os.cpu_count(), **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            llm = None
            error = exc
    if llm is None:
        detail = next((ln for ln in reversed(log) if "error" in ln.lower()), str(error))
        raise StageError(f"llama.cpp cannot load {path}: {detail.strip()[:200]}")
    try:
        yield llm
    finally:
        llm.close()


def tokenize(llm: Any, text: str) -> list[int]:
    """Token ids exactly as llama-cpp-python's completion path makes them (BOS per the GGUF's add_bos flag)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def all_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Logits for every position of `ids` (row i predicts token i+1); needs `logits_all=True`."""
    if len(ids) > llm.n_ctx():
        raise StageError(f"{len(ids)} tokens do not fit llama.cpp's context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
