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
from alpaca_lora_cpu.config import load_params
from tools.bench_doc import DOC_TITLE, machine_stamp, replace_section
from tools.quant_scores import score_row


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "src", "imatrix")
    ap.add_argument("--level", default="q4_0", help="an -ar level (auto-round's GGUF levels)")
    ap.add_argument("--iters", type=int, nargs="+", default=[0, 25, 50, 100, 200])
    ap.add_argument("--merged", type=Path, default=Path("models/merged"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--reference", type=Path, default=Path("models/reference"))
    ap.add_argument("--work", type=Path, default=Path("models/bench-autoround"))
    ap.add_argument("--doc", type=Path, help="also write the table as a stamped section of this Markdown file")
    args = parse_args(ap, argv)
    from alpaca_lora_cpu.quantizer import plan_for, quantize_file
    from stages.evaluate import load_reference
    from stages.quantize import autoround_job, quantize_autoround

    params = load_params(args.params)
    ref = load_reference(args.reference)
    args.work.mkdir(parents=True, exist_ok=True)
    job = autoround_job(params, args.merged, args.data)
    lines = [f"AutoRound `gguf:{args.level}` on models/merged, {len(job.rows)} × {len(job.rows[0])} calibration "
             f"tokens (quantize.autoround otherwise as in params.yaml), scored on the {len(ref.arrays['n_prompt'])} "
             "held-out records against the fine-tuned reference (95% bootstrap intervals over records). Time: "
             "the whole stage's work, AutoRound's own load and export included.", "",
             "| variant | size MB | seconds | mean KLD | top-1 | PPL |", "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def scored(name: str, seconds: float, path: Path) -> None:
        lines.append(score_row(name, path, ref, params, f"{seconds:.0f}"))
        print(lines[-1], flush=True)

    for name in (args.level, f"{args.level}-imat"):
        out = args.work / f"{name}.gguf"
        seconds, _ = quantize_file(args.src, out, plan_for(name, {}), args.imatrix if "imat" in name else None)
        scored(f"{name} (llama.cpp)", seconds, out)
    for iters in args.iters:
        out = args.work / f"{args.level}-ar-{iters}.gguf"
        j = dataclasses.replace(job, params=dataclasses.replace(job.params, iters=iters))
        t0 = time.perf_counter()
        quantize_autoround(args.src, out, plan_for(f"{args.level}-ar", {}), j)
        scored(f"{args.level}-ar, iters {iters}", time.perf_counter() - t0, out)
    if args.doc:
        replace_section(args.doc, f"bench-autoround-{args.level}",
                        f"## bench-autoround {args.level}: {machine_stamp(args.doc)}\n\n" + "\n".join(lines),
                        DOC_TITLE)


if __name__ == "__main__":
    run_cli(main)
