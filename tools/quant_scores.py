"""The quantization benchmarks' shared table (tools/bench_autoround.py, tools/bench_gptq.py): their common
arguments, and a row per GGUF scored as the evaluate stage scores it (mean KLD, top-1 and PPL against the
fine-tuned reference, 95% bootstrap intervals over records), after the caller's own cells; the table goes into
docs/benchmarks.md as a stamped section. Not run directly."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tools.bench_doc import DOC_TITLE, machine_stamp, replace_section


def add_bench_args(ap: argparse.ArgumentParser, work: str) -> None:
    """--reference, --work (models/<work>) and --doc, the same in every quantization bench."""
    ap.add_argument("--reference", type=Path, default=Path("models/reference"))
    ap.add_argument("--work", type=Path, default=Path("models") / work)
    ap.add_argument("--doc", type=Path, help="also write the table as a stamped section of this Markdown file")


class ScoreTable:
    """A Markdown table of scored GGUFs: `| variant | size MB | <cells> | mean KLD | top-1 | PPL |`."""

    def __init__(self, args: argparse.Namespace, cells: list[str]) -> None:
        from alpaca_lora_cpu.config import load_params
        from stages.evaluate import load_reference

        self.params = load_params(args.params)
        self.ref = load_reference(args.reference)
        self.doc = args.doc
        args.work.mkdir(parents=True, exist_ok=True)
        heads = ["variant", "size MB", *cells, "mean KLD", "top-1", "PPL"]
        self.rows = ["| " + " | ".join(heads) + " |", "| --- |" + " ---: |" * (len(heads) - 1)]

    @property
    def records(self) -> int:
        return len(self.ref.arrays["n_prompt"])

    def add(self, name: str, path: Path, *cells: str) -> None:
        self.rows.append(score_row(name, path, self.ref, self.params, *cells))
        print(self.rows[-1], flush=True)

    def write(self, section: str, title: str, intro: str) -> None:
        """Replace the doc's `section` with the stamped title, the intro and the table (no doc: nothing)."""
        if self.doc:
            body = f"## {title}: {machine_stamp(self.doc)}\n\n{intro}\n\n" + "\n".join(self.rows)
            replace_section(self.doc, section, body, DOC_TITLE)


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
