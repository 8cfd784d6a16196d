"""The quantization benchmarks' table row (tools/bench_autoround.py, tools/bench_gptq.py): a GGUF scored as the
evaluate stage scores it (mean KLD, top-1 and PPL against the fine-tuned reference, 95% bootstrap intervals over
records), after the caller's own cells. Not run directly."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def score_row(name: str, path: Path, ref: Any, params: Any, *cells: str) -> str:
    """`| name | size MB | *cells | mean KLD | top-1 | PPL |` for the GGUF at `path`."""
    from alpaca_lora_cpu.intervals import intervals, scored
    from stages.evaluate import score

    s = score(path, ref, params.evaluate.threads, params.intervals)
    iv = params.intervals
    ci = intervals(scored(s["per_record"]), {}, iv.resamples, iv.confidence, iv.seed)

    def cell(key: str, fmt: str) -> str:
        lo, hi = ci.get(key, (float("nan"), float("nan")))
        return f"{fmt.format(s[key])} [{fmt.format(lo)}, {fmt.format(hi)}]"

    middle = "".join(f" {c} |" for c in cells)
    return (f"| {name} | {path.stat().st_size / 1e6:.2f} |{middle} {cell('kld_mean', '{:.4f}')} | "
            f"{cell('top1', '{:.3f}')} | {cell('ppl', '{:.3f}')} |")
