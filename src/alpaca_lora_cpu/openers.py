"""Checked openers for the binary formats a stage reads: safetensors and npz here (GGUF is gguf_files.check_gguf
and gguf_files.open_gguf; JSON and JSONL are files.read_json and files.read_jsonl). Any damage — a missing, empty,
truncated, byte-flipped or wrong-format file — becomes one StageError naming the file and what is wrong, never a
reader's own IndexError, SafetensorError or pickle refusal.

The readers are third-party (gguf-py, safetensors, numpy) and raise whatever their parsing meets, so each opener
catches everything its reader raises while parsing, and only that.
"""
from __future__ import annotations

import os
from pathlib import Path

from alpaca_lora_cpu.errors import StageError


def damaged(path: str | os.PathLike, kind: str, exc: BaseException | None = None, hint: str = "",
            what: str = "") -> StageError:
    """The one-line error for a file that is not a readable `kind`."""
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}" if exc is not None and str(exc) else \
        (type(exc).__name__ if exc is not None else "")
    head = f"{what} {path}" if what else str(path)
    return StageError(f"{head} is damaged or not a {kind} file" + (f" ({detail})" if detail else "")
                      + (f"; {hint}" if hint else ""))


def present(path: Path, kind: str, what: str, hint: str) -> None:
    if not path.is_file():
        raise StageError(f"{what or kind} {path} not found" + (f" ({hint})" if hint else ""))
    if path.stat().st_size == 0:
        raise damaged(path, kind, hint=hint, what=what) from None


def safetensors_keys(path: str | os.PathLike, what: str = "", hint: str = "") -> dict[str, tuple]:
    """{tensor name: (shape, dtype)} of a safetensors file, read from its header; the header's offsets are checked
    against the file size by safetensors itself."""
    from safetensors import safe_open

    p = Path(path)
    present(p, "safetensors", what, hint)
    try:
        with safe_open(str(p), framework="pt") as fh:
            out = {}
            for name in fh.keys():
                sl = fh.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for damage
        raise damaged(p, "safetensors", exc, hint, what) from exc


def load_safetensors(path: str | os.PathLike, what: str = "", hint: str = "") -> dict:
    """Every tensor of a (small) safetensors file, e.g. a LoRA adapter."""
    from safetensors.torch import load_file

    p = Path(path)
    present(p, "safetensors", what, hint)
    try:
        return load_file(str(p))
    except Exception as exc:
        raise damaged(p, "safetensors", exc, hint, what) from exc


def load_npz(path: str | os.PathLike, keys: tuple[str, ...] = (), what: str = "", hint: str = "") -> dict:
    """Every array of an .npz file, read now (numpy reads members lazily), pickles refused; `keys` must be there."""
    import numpy as np

    p = Path(path)
    present(p, "npz", what, hint)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object arrays), EOFError, OSError …
        raise damaged(p, "npz", exc, hint, what) from exc
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise StageError(f"{what + ' ' if what else ''}{p}: no array {', '.join(missing)} (has "
                         f"{', '.join(sorted(arrays)) or 'none'}){'; ' + hint if hint else ''}")
    return arrays
