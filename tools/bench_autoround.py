"""bench-autoround: AutoRound's KLD against its wall time, one run per `iters`, for one -ar level, with llama.cpp's
plain and imatrix files of that level beside it; the curve `quantize.autoround.iters` is chosen from.

Run (make bench-autoround AR_LEVEL=q4_0 AR_ITERS="0 25 50 100 200", after make repro):
    python -m tools.bench_autoround --params params.yaml --level q4_0 --iters 0 25 50 \
        --merged models/merged --data data/prepared --src models/gguf/finetuned-reference.gguf \
        --imatrix models/imatrix/imatrix.gguf --reference models/reference --doc docs/benchmarks.md

Each file is made exactly as quantize@<level>-ar makes it (stages/quantize.py, the other params as in
params.yaml) and scored as evaluate scores it (stages/evaluate.py: mean KLD, top-1 and PPL against the fine-tuned
reference on the held-out records, with 95% bootstrap intervals). Time it alone on the machine.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from tools.quant_scores import ScoreTable, add_bench_args


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "src", "imatrix")
    ap.add_argument("--level", default="q4_0", help="an -ar level (auto-round's GGUF levels)")
    ap.add_argument("--iters", type=int, nargs="+", default=[0, 25, 50, 100, 200])
    ap.add_argument("--merged", type=Path, default=Path("models/merged"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    add_bench_args(ap, "bench-autoround")
    args = parse_args(ap, argv)
    from alpaca_lora_cpu.quantizer import plan_for, quantize_file
    from stages.quantize import autoround_job, quantize_autoround

    table = ScoreTable(args, ["seconds"])
    job = autoround_job(table.params, args.merged, args.data)
    for name in (args.level, f"{args.level}-imat"):
        out = args.work / f"{name}.gguf"
        seconds, _ = quantize_file(args.src, out, plan_for(name, {}), args.imatrix if "imat" in name else None)
        table.add(f"{name} (llama.cpp)", out, f"{seconds:.0f}")
    for iters in args.iters:
        out = args.work / f"{args.level}-ar-{iters}.gguf"
        j = dataclasses.replace(job, params=dataclasses.replace(job.params, iters=iters))
        t0 = time.perf_counter()
        quantize_autoround(args.src, out, plan_for(f"{args.level}-ar", {}), j)
        table.add(f"{args.level}-ar, iters {iters}", out, f"{time.perf_counter() - t0:.0f}")
    table.write(f"bench-autoround-{args.level}", f"bench-autoround {args.level}",
                f"AutoRound `gguf:{args.level}` on models/merged, {len(job.rows)} × {len(job.rows[0])} calibration "
                f"tokens (quantize.autoround otherwise as in params.yaml), scored on the {table.records} held-out "
                "records against the fine-tuned reference (95% bootstrap intervals over records). Time: the whole "
                "stage's work, AutoRound's own load and export included.")


if __name__ == "__main__":
    run_cli(main)
