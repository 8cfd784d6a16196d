"""AutoRound levels (`<level>-ar` quantize.types entries): Intel's SignRound (auto-round on PyPI) tunes each
weight's rounding and the block scales on each decoder block's output over calibration text, then writes GGUF.

Used by the quantize stage (stages/quantize.py). The result keeps llama.cpp's file layout: the stage first
quantizes the same level with llama.cpp, then every tensor AutoRound stored in the same GGML type (same bytes)
replaces llama.cpp's, and the rest stay llama.cpp's (`transplant`). So an `-ar` file has exactly the size, the
metadata and the tokenizer of the llama.cpp file of its level: the comparison is rounding against rounding.

Cost: AutoRound loads models/merged whole (fp32 on a CPU) and, block by block, runs `iters` sign-gradient steps
over `nsamples` × `seqlen` calibration tokens; `iters: 0` is its optimised round-to-nearest, minutes at 135M.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError

log = logging.getLogger("autoround")

def calibration_chunks(sequences: list[list[int]], nsamples: int, seqlen: int) -> list[list[int]]:
    """The imatrix's calibration sequences (records in order) packed end to end into at most `nsamples` rows of
    exactly `seqlen` tokens (AutoRound's calibration batches are fixed-length)."""
    flat = [t for s in sequences for t in s]
    rows = [flat[i:i + seqlen] for i in range(0, len(flat) - seqlen + 1, seqlen)][:nsamples]
    if not rows:
        raise StageError(f"quantize.autoround.seqlen: {seqlen} is more than the {len(flat)} calibration tokens "
                         "(imatrix.max_tokens, imatrix.source)")
    return rows


def quantize(merged: Path, level: str, rows: list[list[int]], params: Any, work: Path) -> tuple[Path, float]:
    """AutoRound of the merged checkpoint at `level` (its `gguf:<level>` format) into `work`; (the GGUF it
    wrote, seconds)."""
    import torch
    from transformers import AutoTokenizer

    os.environ.setdefault("AR_LOG_LEVEL", "WARNING")
    from auto_round import AutoRound

    torch.manual_seed(params.seed)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    data = [torch.tensor([r], dtype=torch.long) for r in rows]
    t0 = time.perf_counter()
    ar = AutoRound(str(merged), tokenizer=tokenizer, scheme=f"gguf:{level}", iters=params.iters,
                   nsamples=len(rows), seqlen=len(rows[0]), dataset=data, device_map="cpu",
                   batch_size=min(params.batch_size, len(rows)), seed=params.seed)
    ar.quantize_and_save(output_dir=str(work), format=f"gguf:{level}")
    seconds = time.perf_counter() - t0
    found = sorted(work.rglob("*.gguf"))
    if len(found) != 1:
        raise StageError(f"auto-round wrote {len(found)} GGUF files for gguf:{level} in {work}, expected one")
    return found[0], seconds


def transplant(llama_file: Path, ar_file: Path, out: Path) -> dict:
    """`llama_file`'s metadata and tensors, each tensor replaced by AutoRound's where AutoRound stored it in the
    same GGML type and shape; what was taken and what was kept (with why), for the details."""
    from alpaca_lora_cpu.gguf_files import assemble, check_gguf

    ours = {t.name: t for t in check_gguf(llama_file).tensors}
    theirs = {t.name: t for t in check_gguf(ar_file).tensors}
    taken, kept = [], {}
    for name, t in ours.items():
        a = theirs.get(name)
        if a is None:
            why = "not in auto-round's file"
        elif a.shape != t.shape:
            raise StageError(f"{ar_file}: {name} has shape {a.shape}, llama.cpp's {t.shape}: not the same model")
        elif a.type != t.type:
            why = f"auto-round stored {a.type}, llama.cpp {t.type}"
        else:
            taken.append(name)
            continue
        kept[name] = why
    if not any(ours[n].type not in ("F32", "F16", "BF16") for n in taken):
        raise StageError(f"{ar_file}: no quantized tensor matches llama.cpp's {llama_file.name} (types differ "
                         "everywhere)")
    assemble(llama_file, {n: ar_file for n in taken}, out)
    return {"taken": len(taken), "kept": len(kept), "kept_why": _group(kept)}


def _group(kept: dict[str, str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, why in kept.items():
        g = out.setdefault(why, {"count": 0, "examples": []})
        g["count"] += 1
        if len(g["examples"]) < 3:
            g["examples"].append(name)
    return out


def make(merged: Path, level: str, rows: list[list[int]], params: Any, llama_file: Path, out: Path) -> dict:
    """The `-ar` file at `out` (llama_file: llama.cpp's file of the same level), and its details."""
    with tempfile.TemporaryDirectory(prefix="autoround-", dir=out.parent) as work:
        ar_file, seconds = quantize(merged, level, rows, params, Path(work))
        details = transplant(llama_file, ar_file, out)
    return {**details, "autoround_seconds": seconds, "calibration_rows": len(rows),
            "calibration_tokens": sum(map(len, rows))}
