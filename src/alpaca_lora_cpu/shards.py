"""Hugging Face checkpoints one tensor at a time: read a safetensors folder through its headers, write one shard
by shard. No stage holds a whole model: peak memory is about one shard (written) plus one tensor (read).

    weights = Weights(folder)            # headers only: names, shapes, dtypes, which file
    w = weights.get("model.norm.weight", torch.float32)
    with ShardWriter(out, max_shard_bytes=200 * 2**20) as writer:
        writer.add("model.norm.weight", w)
    # → model-00001-of-0000N.safetensors …, model.safetensors.index.json (or model.safetensors when one shard)

Damaged headers, missing tensors and shape mismatches are one-line StageErrors naming the file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
NUMPY = {"F32": "float32", "F16": "float16", "F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16",
         "I8": "int8", "U8": "uint8", "BOOL": "bool"}
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'200MB' → 200_000_000 (transformers' units: KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", text.upper())
    if not m:
        raise StageError(f"cannot read the size {text!r} (e.g. 200MB, 2GB, 512MiB)")
    return int(float(m[1]) * UNITS[m[2]])


def checkpoint_files(folder: Path, what: str) -> list[Path]:
    """The safetensors files of a Hugging Face model folder; a one-line error when it is not one."""
    if not (folder / "config.json").is_file():
        raise StageError(f"{what} {folder}: no config.json (not a Hugging Face model folder)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise StageError(f"{what} {folder}: no *.safetensors weights")
    return files


class Weights:
    """A safetensors checkpoint folder, read lazily: the headers at open, each tensor when asked for."""

    def __init__(self, folder: str | Path, what: str = "model") -> None:
        from alpaca_lora_cpu.memory import steady_heap
        from alpaca_lora_cpu.openers import safetensors_keys

        steady_heap()  # reading tensor after tensor: let each one's memory go back when it is freed
        self.folder, self.what = Path(folder), what
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise StageError(f"{what} {self.folder}: no *.safetensors weights")
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        for f in files:
            for name, (shape, dtype) in safetensors_keys(f, what).items():
                self.file_of[name], self.shape[name], self.dtype[name] = f, shape, dtype
        self._open: dict[Path, Any] = {}
        self._maps: dict[Path, tuple[Any, int, dict]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def files(self) -> list[Path]:
        return sorted(set(self.file_of.values()))

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape[name]:
            n *= d
        return n

    def get(self, name: str, dtype: Any = None) -> Any:
        """One tensor (a fresh copy, cast to `dtype` if given)."""
        from safetensors import safe_open

        if name not in self.file_of:
            raise StageError(f"{self.what} {self.folder}: no tensor {name!r}")
        f = self.file_of[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        t = self._open[f].get_tensor(name)
        return t if dtype is None else t.to(dtype)

    def view(self, name: str) -> Any:
        """The tensor as stored, on the file's own bytes (a copy-on-write memory map: the page cache holds it, not
        the process). torch.save of such views streams the file instead of holding it."""
        import numpy as np
        import torch

        f = self.file_of[name]
        if f not in self._maps:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            self._maps[f] = (np.memmap(f, dtype=np.uint8, mode="c"), 8 + n, header)
        mm, start, header = self._maps[f]
        entry = header[name]
        begin, end = entry["data_offsets"]
        raw = mm[start + begin:start + end]
        if entry["dtype"] == "BF16":
            return torch.from_numpy(raw.view(np.uint16)).view(torch.bfloat16).reshape(entry["shape"])
        return torch.from_numpy(raw.view(NUMPY[entry["dtype"]])).reshape(entry["shape"])

    def close(self) -> None:
        self._open.clear()
        self._maps.clear()


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (a tensor larger than that gets a shard
    of its own), in the order given, and the index transformers reads. Use as a context manager; call `add` per
    tensor. One shard's tensors are held until it is written."""

    def __init__(self, folder: str | Path, max_shard_bytes: int) -> None:
        self.folder, self.limit = Path(folder), max_shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def add(self, name: str, tensor: Any) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        """End the current shard here (the next tensor starts a new one)."""
        if self.pending:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is not None:
            return
        if self.pending or not self.written:
            self._flush()
        self._finish()

    def _finish(self) -> None:
        """Name the shards as transformers does, and write the index when there is more than one."""
        n = len(self.written)
        if n == 1:
            self.written[0][0].rename(self.folder / SINGLE)
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.written, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
