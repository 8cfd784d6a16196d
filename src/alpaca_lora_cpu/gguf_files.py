"""GGUF files without llama.cpp: validate them, read metadata, tensor types and bits per weight, and write one
from other GGUFs' tensors.

llama.cpp aborts or segfaults on some malformed files, so `llama.open_llama` calls `check_gguf` first (magic, a
header that parses, every tensor's data inside the file); problems become a one-line `StageError`. The header is
scanned here in one pass over a memory map (the `gguf` package's reader builds every vocabulary entry as an array,
seconds per open for a 49k vocabulary; tests/test_gguf_convert.py checks both read the same). Shared by convert,
quantize, search, evaluate and the tools.
"""
from __future__ import annotations

import functools
import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError

MAGIC = b"GGUF"
# GGUF value types: struct format of the scalars; 8 = string, 9 = array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str          # GGML type name as stored, e.g. "Q4_K", "F32"
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length (ncols)
    n_elements: int
    n_bytes: int
    type_id: int = 0      # the GGML type's number
    data_offset: int = 0  # where its bytes start in the file


@dataclass(frozen=True)
class Header:
    """A GGUF's metadata and tensor table. Scalars and strings are read; arrays are kept as (type, count,
    offset) and decoded when asked (`array`)."""
    path: Path
    values: dict[str, Any]
    arrays: dict[str, tuple[int, int, int]]
    tensors: tuple[TensorInfo, ...]
    info_offset: int   # where the tensor table starts: everything before it is the header and metadata
    alignment: int

    def array(self, key: str) -> list | None:
        if key not in self.arrays:
            return None
        kind, n, offset = self.arrays[key]
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _Cursor(mm, offset).items(kind, n)


class _Cursor:
    def __init__(self, buf: Any, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        if n > len(self.buf) - self.pos:
            raise ValueError(f"a string of {n} bytes at byte {self.pos} runs past the end")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def skip_string(self) -> None:
        n = self.unpack("Q")
        if n > len(self.buf) - self.pos:
            raise ValueError(f"a string of {n} bytes at byte {self.pos} runs past the end")
        self.pos += n

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        raise ValueError(f"unknown GGUF value type {kind} at byte {self.pos}")

    def items(self, kind: int, n: int) -> list:
        if kind == STRING:
            return [self.string() for _ in range(n)]
        fmt = SCALARS.get(kind)
        if fmt is None:
            raise ValueError(f"an array of GGUF type {kind} cannot be read")
        size = struct.calcsize(fmt)
        values = list(struct.unpack_from(f"<{n}{fmt}", self.buf, self.pos))
        self.pos += n * size
        return values

    def skip_array(self, kind: int, n: int) -> None:
        if kind == STRING:
            for _ in range(n):
                self.skip_string()
        elif kind in SCALARS:
            self.pos += n * struct.calcsize(SCALARS[kind])
        else:
            raise ValueError(f"an array of GGUF type {kind} cannot be read")
        if self.pos > len(self.buf):
            raise ValueError("an array runs past the end of the file")


def _scan(path: Path) -> Header:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm, 4)
        version, n_tensors, n_kv = c.unpack("I"), c.unpack("Q"), c.unpack("Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader takes 2 and 3)")
        values, arrays = {}, {}
        for _ in range(n_kv):
            key, kind = c.string(), c.unpack("I")
            if kind == ARRAY:
                item, n = c.unpack("I"), c.unpack("Q")
                arrays[key] = (item, n, c.pos)
                c.skip_array(item, n)
            else:
                values[key] = c.value(kind)
        info_offset = c.pos
        raw = []
        for _ in range(n_tensors):
            name, n_dims = c.string(), c.unpack("I")
            dims = tuple(c.unpack("Q") for _ in range(n_dims))
            raw.append((name, dims, c.unpack("I"), c.unpack("Q")))
        alignment = int(values.get("general.alignment", 32))
        start = -(-c.pos // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in raw:
        ggml = GGMLQuantizationType(type_id)
        block, size = GGML_QUANT_SIZES[ggml]
        n = 1
        for d in dims:
            n *= d
        tensors.append(TensorInfo(name, ggml.name, dims, n, n * size // block, type_id, start + offset))
    return Header(path, values, arrays, tuple(tensors), info_offset, alignment)


@functools.lru_cache(maxsize=32)
def _header(path: str, mtime_ns: int, size: int) -> Header:
    return _scan(Path(path))


def check_gguf(path: str | os.PathLike) -> Header:
    """The header of `path` (cached per file version), or a StageError if it is not a complete GGUF file."""
    p = Path(path)
    if not p.is_file():
        raise StageError(f"GGUF file {p} not found")
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head != MAGIC:
        raise StageError(f"{p} is not a GGUF file (starts with {head!r}, expected {MAGIC!r})")
    st = p.stat()
    try:
        header = _header(str(p), st.st_mtime_ns, st.st_size)
    except Exception as exc:  # struct.error, ValueError, IndexError, UnicodeError on a cut or garbled header
        raise StageError(f"{p} is a damaged GGUF file: cannot read its header "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from exc
    for t in header.tensors:
        if t.data_offset + t.n_bytes > st.st_size:
            raise StageError(f"{p} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,} "
                             f"but the file has {st.st_size:,} bytes")
    if not header.tensors:
        raise StageError(f"{p} holds no tensors (vocab-only GGUF?)")
    return header


def open_gguf(path: str | os.PathLike, what: str = "", hint: str = "") -> Any:
    """gguf-py's GGUFReader on `path`, after the project's header scan (gguf_files.check_gguf: magic, header,
    every tensor's extent within the file), so a truncated file fails here, not when a tensor is read."""
    from gguf import GGUFReader

    from alpaca_lora_cpu.openers import damaged, present

    p = Path(path)
    present(p, "GGUF", what, hint)
    try:
        check_gguf(p)
    except StageError as exc:
        raise StageError(f"{what + ' ' if what else ''}{exc}{'; ' + hint if hint else ''}") from exc
    try:
        return GGUFReader(str(p))
    except Exception as exc:  # gguf-py raises IndexError, ValueError, struct errors, KeyError … on damage
        raise damaged(p, "GGUF", exc, hint, what) from exc


def gguf_field(reader: Any, key: str, path: str | os.PathLike, what: str = "") -> Any:
    """A metadata value of an opened GGUF (`contents()`), or a one-line error naming the key."""
    field = reader.fields.get(key)
    try:
        if field is None:
            raise KeyError(key)
        return field.contents()
    except Exception as exc:
        raise StageError(f"{what + ' ' if what else ''}{path}: GGUF metadata {key!r} is missing or unreadable") \
            from exc


def check_model_gguf(path: str | os.PathLike) -> Header:
    """check_gguf, and the file is a model llama.cpp can run (not an imatrix, LoRA or vocabulary-only GGUF)."""
    header = check_gguf(path)
    kind = field_value(header, "general.type")
    if kind not in (None, "model"):
        raise StageError(f"{path} is a llama.cpp {kind} file, not a model (general.type = {kind!r})")
    if not field_value(header, "general.architecture"):
        raise StageError(f"{path} is not a model GGUF: it has no general.architecture")
    return header


def field_value(header: Header, key: str) -> Any:
    """A scalar or string metadata value, or None when absent."""
    return header.values.get(key)


def eos_text(header: Header) -> str | None:
    """The EOS token's text from the GGUF's vocabulary (e.g. `<|im_end|>`), or None when the file has none."""
    return token_text(header, "tokenizer.ggml.eos_token_id")


def token_text(header: Header, key: str) -> str | None:
    """The text of the token a metadata key names (`tokenizer.ggml.bos_token_id`, …), or None."""
    token_id = field_value(header, key)
    tokens = header.array("tokenizer.ggml.tokens") if token_id is not None else None
    return tokens[token_id] if tokens is not None and 0 <= token_id < len(tokens) else None


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


def tensor_infos(header_or_path: Header | str | os.PathLike) -> list[TensorInfo]:
    header = header_or_path if isinstance(header_or_path, Header) else check_gguf(header_or_path)
    return list(header.tensors)


def type_counts(infos: list[TensorInfo]) -> dict[str, int]:
    return dict(sorted(Counter(t.type for t in infos).items()))


def bits_per_weight(infos: list[TensorInfo]) -> float:
    """Stored bits per parameter over all tensors (what llama.cpp reports as BPW)."""
    return 8 * sum(t.n_bytes for t in infos) / sum(t.n_elements for t in infos)


def assemble(base: str | os.PathLike, sources: dict[str, str | os.PathLike], out: str | os.PathLike) -> None:
    """A GGUF with `base`'s metadata and tensor order, each tensor's bytes copied from `sources[name]` (the tensor
    of that name there, in whatever type it has) or else from `base`. The layout is llama.cpp's own (the metadata
    bytes verbatim, tensor infos, each tensor padded to the alignment), so assembling the tensors of a recipe
    from files quantized whole gives the bytes llama.cpp writes when it quantizes that recipe directly."""
    b = check_gguf(base)
    align = b.alignment
    picked = []
    for t in b.tensors:
        path = sources.get(t.name, base)
        s = t if path == base else next((x for x in check_gguf(path).tensors if x.name == t.name), None)
        if s is None or s.shape != t.shape:
            raise StageError(f"{path}: no tensor {t.name} of shape {t.shape} to take")
        picked.append((s, path))
    with open(base, "rb") as fh:
        head = fh.read(b.info_offset)
    infos, offset = [], 0
    for s, _ in picked:
        name = s.name.encode()
        infos.append(struct.pack(f"<Q{len(name)}sI{len(s.shape)}QIQ", len(name), name, len(s.shape), *s.shape,
                                 s.type_id, offset))
        offset += -(-s.n_bytes // align) * align
    with open(out, "wb") as fh:
        fh.write(head)
        for info in infos:
            fh.write(info)
        fh.write(b"\0" * (-fh.tell() % align))
        for s, path in picked:
            with open(path, "rb") as src:
                src.seek(s.data_offset)
                left = s.n_bytes
                while left:
                    block = src.read(min(left, 1 << 24))
                    fh.write(block)
                    left -= len(block)
            fh.write(b"\0" * (-s.n_bytes % align))
