"""GGUF files without llama.cpp: validate them, read metadata, tensor types and bits per weight.

llama.cpp aborts or segfaults on some malformed files, so `llama.open_llama` calls `check_gguf` first (magic, a
header the `gguf` package can parse, every tensor's data inside the file); problems become a one-line
`StageError`. Shared by convert, quantize, evaluate and the tools.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError

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


def eos_text(reader: Any) -> str | None:
    """The EOS token's text from the GGUF's vocabulary (e.g. `<|im_end|>`), or None when the file has none."""
    return token_text(reader, "tokenizer.ggml.eos_token_id")


def token_text(reader: Any, key: str) -> str | None:
    """The text of the token a metadata key names (`tokenizer.ggml.bos_token_id`, …), or None."""
    token_id = field_value(reader, key)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return bytes(tokens.parts[tokens.data[token_id]]).decode() if tokens is not None and token_id is not None else None


class ChatTemplate:
    """The GGUF's own chat template (`tokenizer.chat_template`, copied there by the converter), rendered in
    llama-cpp-python's Jinja sandbox, with the two members prompts.to_turns reads of a tokenizer."""

    def __init__(self, template: str, bos_token: str, eos_token: str) -> None:
        self.chat_template, self.bos_token, self.eos_token = template, bos_token, eos_token

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(self.chat_template, eos_token=self.eos_token, bos_token=self.bos_token,
                                        add_generation_prompt=add_generation_prompt)
        return formatter(messages=messages).prompt


def chat_template(reader: Any) -> ChatTemplate | None:
    """The GGUF's chat template, or None when it has none."""
    template = field_value(reader, "tokenizer.chat_template")
    if not template:
        return None
    return ChatTemplate(template, token_text(reader, "tokenizer.ggml.bos_token_id") or "",
                        token_text(reader, "tokenizer.ggml.eos_token_id") or "")


def tensor_infos(reader_or_path: Any) -> list[TensorInfo]:
    reader = check_gguf(reader_or_path) if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path
    return [TensorInfo(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_elements),
                       int(t.n_bytes)) for t in reader.tensors]


def type_counts(infos: list[TensorInfo]) -> dict[str, int]:
    return dict(sorted(Counter(t.type for t in infos).items()))


def bits_per_weight(infos: list[TensorInfo]) -> float:
    """Stored bits per parameter over all tensors (what llama.cpp reports as BPW)."""
    return 8 * sum(t.n_bytes for t in infos) / sum(t.n_elements for t in infos)
