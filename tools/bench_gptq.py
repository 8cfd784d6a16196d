"""bench-gptq: GPTQ rounding in ggml's Q4_0 and IQ4_NL blocks (src/alpaca_lora_cpu/gptq.py) against llama.cpp's
plain and imatrix rounding of the same levels, at the same size; KLD, top-1 and PPL against the fine-tuned
reference, with the summed proxy error tr(ΔW H ΔWᵀ) of each file and the time GPTQ took.

Run (make bench-gptq GPTQ_LEVELS="q4_0 iq4_nl" GPTQ_DAMP="0.01", after make repro):
    python -m tools.bench_gptq --params params.yaml --levels q4_0 iq4_nl --damp 0.01 --joint-refit --act-order \
        --src models/gguf/finetuned-reference.gguf --imatrix models/imatrix/imatrix.gguf \
        --hessians models/imatrix/hessians --reference models/reference --doc docs/benchmarks.md

H is the imatrix stage's (imatrix.covariance): summed over the imatrix's own calibration tokens in the same
layer-by-layer pass, so GPTQ and the imatrix see the same tokens, as in the pipeline's -gptq levels. Scoring is the
evaluate stage's (stages/evaluate.py). Time it alone on the machine.
"""
from __future__ import annotations

from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from tools.quant_scores import ScoreTable, add_bench_args


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "src", "imatrix")
    ap.add_argument("--levels", nargs="+", default=["q4_0", "iq4_nl"],
                    help="levels GPTQ writes (gptq.FORMATS), recipe names or `searched`: each rounded as <entry>-gptq")
    ap.add_argument("--damp", type=float, nargs="+", default=[0.01], help="GPTQ damping, one file per value")
    ap.add_argument("--joint-refit", action="store_true", help="also a file per damp with gptq.refit (opt-in)")
    ap.add_argument("--act-order", action="store_true", help="also a file per damp with act-order (static scales)")
    ap.add_argument("--hessians", type=Path, default=Path("models/imatrix/hessians"))
    ap.add_argument("--searched", type=Path, default=Path("models/search/recipe.json"))
    add_bench_args(ap, "bench-gptq")
    args = parse_args(ap, argv)
    from alpaca_lora_cpu import gptq
    from alpaca_lora_cpu.config import GptqParams
    from alpaca_lora_cpu.quantizer import plan_for, quantize_file
    from alpaca_lora_cpu.variants import GPTQ, GPTQ_LEVELS, IMAT
    from stages.quantize import quantize_gptq

    table = ScoreTable(args, ["seconds", "proxy error"])
    params = table.params
    recipes = params.quantize.recipes
    hessians = gptq.Hessians(args.hessians)

    options = [(joint, act) for joint in (False, True)[:1 + args.joint_refit]
               for act in (False, True)[:1 + args.act_order]]
    for entry in args.levels:
        # llama.cpp's own files of the entry: the level plain and with the imatrix, or the recipe as it says
        rivals = [entry, entry + IMAT] if entry in GPTQ_LEVELS else [entry]
        files = {name: args.work / f"{name}.gguf" for name in rivals}
        took = {name: quantize_file(args.src, files[name], plan_for(name, recipes, args.searched),
                                    args.imatrix if plan_for(name, recipes, args.searched).imatrix else None)[0]
                for name in rivals}
        runs = []
        for damp in args.damp:
            for joint, act in options:
                tag = f"damp {damp:g}" + (", joint refit" if joint else "") + (", act order" if act else "")
                out = args.work / f"{entry}-gptq-{damp:g}{'-refit' if joint else ''}{'-act' if act else ''}.gguf"
                gptq_options = GptqParams(damp, act, params.quantize.gptq.head)
                seconds, _, details = quantize_gptq(args.src, out, plan_for(entry + GPTQ, recipes, args.searched),
                                                    args.imatrix, args.hessians, gptq_options, joint)
                runs.append((tag, out, seconds, details["proxy_error"]))
        errors = runs[0][3]
        below = sum(e["gptq"] < e["compare"] for e in errors.values())
        print(f"{entry}: GPTQ's proxy error below the imatrix rounding's in {below} of {len(errors)} tensors",
              flush=True)
        for name in rivals:  # the layout's rounding (plain, or the recipe's own), then the imatrix's
            key = "compare" if name.endswith(IMAT) or len(rivals) == 1 else "llama_cpp"
            table.add(f"{name} (llama.cpp)", files[name], f"{took[name]:.0f}",
                      f"{sum(e[key] for e in errors.values()):.4g}")
        for tag, out, seconds, errs in runs:
            worse = sum(e["gptq"] >= e["compare"] for e in errs.values())
            table.add(f"{entry}-gptq, {tag} ({worse} tensors not below -imat)", out, f"{seconds:.0f}",
                      f"{sum(e['gptq'] for e in errs.values()):.4g}")
    table.write("bench-gptq", "bench-gptq",
                f"H = Σ x xᵀ of every decoder linear's input over the imatrix's {hessians.tokens} calibration tokens "
                f"(the imatrix stage's {args.hessians}); scored on the {table.records} records of models/reference "
                "against the fine-tuned reference (95% bootstrap intervals over records). Proxy error: Σ over the "
                "rewritten tensors of tr(ΔW H ΔWᵀ). Seconds: llama.cpp's quantizer, or the quantize stage's whole "
                "-gptq work (llama.cpp's file of the entry, then GPTQ; the covariances not included). A recipe's "
                "GPTQ rewrites its Q4_0 / Q5_0 / IQ4_NL tensors.")


if __name__ == "__main__":
    run_cli(main)
