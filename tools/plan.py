"""plan: each stage's predicted wall time and peak memory for the configured model on this machine (make plan;
make repro prints it first).

Run: python -m tools.plan [--model models/base] [--memory 16GB] [--rates rates.json] [--json plan.json]

The model is `--model` (a Hugging Face folder, a config.json or a GGUF), else models/base when it exists, else
params.yaml's `base.model` (its config only: nothing is downloaded or loaded). The rates are this machine's,
measured once and cached (alpaca_lora_cpu/machine.py), or another machine's from `--rates` (a JSON file of the
same keys). Stages whose predicted memory exceeds what this machine has (or `--memory`) are marked; each of them
refuses to start in one line, naming the params that would make it fit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import load_params
from alpaca_lora_cpu.cost import GB, Shape, stage_costs, work
from alpaca_lora_cpu.errors import StageError


def shape_of(model: str | None, base_model: str) -> tuple[Shape, str]:
    """The model to plan for and where its shape came from."""
    if model:
        path = Path(model)
        if path.suffix == ".gguf":
            from alpaca_lora_cpu.gguf_files import check_gguf

            return Shape.of_gguf(check_gguf(path)), str(path)
        return Shape.of(json.loads(path.read_text())) if path.is_file() else Shape.read(path), str(path)
    if (Path("models/base") / "config.json").is_file():
        return Shape.read("models/base"), "models/base"
    from stages.base import resolve

    src = resolve(base_model)
    if src.kind in ("builtin", "gguf"):
        from alpaca_lora_cpu.gguf_files import check_gguf

        return Shape.of_gguf(check_gguf(src.ref)), base_model
    if src.kind == "dir":
        return Shape.read(src.ref), base_model
    from transformers import AutoConfig

    try:
        return Shape.of(AutoConfig.from_pretrained(src.ref)), base_model
    except OSError as exc:
        raise StageError(f"base.model {base_model!r}: no config to plan with ({str(exc).splitlines()[0][:120]}); "
                         "give --model") from exc


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min" if seconds >= 90 \
        else f"{seconds:.0f} s"


def table(costs: list, have: float) -> list[str]:
    lines = [f"{'stage':<26} {'time':>9} {'peak GB':>8} {'mapped GB':>9}  fits {have / GB:.1f} GB"]
    for c in costs:
        fits = "yes" if c.memory <= have else f"NO: lower {c.hint}"
        lines.append(f"{c.stage:<26} {hours(c.seconds):>9} {c.peak / GB:8.2f} {c.mapped / GB:9.2f}  {fits}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--model", help="plan for this model: a Hugging Face folder, its config.json, or a GGUF")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"), help="the prepared data, when there is")
    ap.add_argument("--memory", help="plan for a machine with this much memory (e.g. 16GB)")
    ap.add_argument("--rates", type=Path, help="another machine's measured rates (JSON), instead of this one's")
    ap.add_argument("--json", type=Path, help="also write the plan here")
    args = parse_args(ap, argv)
    params = load_params(args.params)
    shape, where = shape_of(args.model, params.base.model)
    if args.rates:
        rates, machine = json.loads(args.rates.read_text()), f"the rates in {args.rates}"
    else:
        from alpaca_lora_cpu.machine import rates as measured

        rates, machine = measured(params.evaluate.threads), "this machine (measured, cached in .venv/machine.json)"
    from alpaca_lora_cpu.memory import available_memory, parse_bytes

    have = parse_bytes(args.memory) if args.memory else available_memory()
    costs = stage_costs(params, shape, work(params, args.data if args.data.is_dir() else None), rates)
    total = sum(c.seconds for c in costs)
    print(f"plan for {where}: {shape.params / 1e9:.2f} B parameters ({shape.layers} layers, hidden {shape.hidden}), "
          f"on {machine}: fp32 matmul {rates['fp32_gflops']:.0f} GFLOP/s, bf16 {rates['bf16_gflops']:.0f}, "
          f"memory read {rates['bandwidth_bytes_per_s'] / GB:.1f} GB/s, {params.evaluate.threads} threads")
    if not args.data.is_dir():
        print(f"(no prepared data in {args.data}: token counts assume a 1% sample of alpaca-cleaned, 466 + 52 records "
              "of ~180 tokens; `dvc repro prepare` first for the real counts)")
    print("\n".join(table(costs, have)))
    print(f"total predicted: {hours(total)} of pipeline time; peak memory {max(c.memory for c in costs) / GB:.1f} GB "
          f"(the largest stage), {have / GB:.1f} GB available")
    if args.json:
        args.json.write_text(json.dumps({"model": where, "parameters": shape.params, "available_bytes": have,
                                         "rates": rates, "total_seconds": total,
                                         "stages": [c.__dict__ for c in costs]}, indent=1) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
