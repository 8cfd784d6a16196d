"""bench-infer: llama-cpp-python generation speed of one GGUF against this machine's memory-bandwidth bound.

Run (make bench-infer QUANT=q4_0):
    python -m tools.bench_infer --params params.yaml --gguf models/gguf/finetuned-q4_0.gguf

Generating one token reads (about) every weight once, so generation speed is bounded by
memory bandwidth ÷ bytes read per token. Bytes per token = the GGUF's tensor data (its file size less the
metadata; the token-embedding lookup reads one row, but with tied embeddings the output layer reads the whole
matrix anyway). Bandwidth = the best of several passes summing a 2 GiB array, split over the same threads
(numpy releases the GIL), i.e. a read-only stream like a weight scan (alpaca_lora_cpu/machine.py). Prints
measured tok/s, the bound and their ratio. Small models can partly sit in the CPU caches, so ratios above 1 are
possible.
"""
from __future__ import annotations

from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import load_params
from alpaca_lora_cpu.errors import StageError
from tools.bench_doc import DOC_TITLE, machine_stamp, replace_section


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF (what inference reads), from its header."""
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(str(path)).tensors))


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "gguf")
    ap.add_argument("--doc", type=Path, help="also write the result as a stamped section of this Markdown file")
    args = parse_args(ap, argv)
    from alpaca_lora_cpu.llama import bench

    params = load_params(args.params).evaluate
    if not args.gguf.is_file():
        raise StageError(f"GGUF file {args.gguf} not found (run `make repro`, or pick QUANT= from models/gguf/)")
    s = params.speed
    speed = bench(args.gguf, threads=params.threads, prompt_tokens=s.prompt_tokens, gen_tokens=s.gen_tokens,
                  runs=s.runs)
    from alpaca_lora_cpu.machine import bandwidth

    bw = bandwidth(params.threads)
    per_token = tensor_bytes(args.gguf)
    bound = bw / per_token
    rows = [("model", args.gguf.name), ("threads", str(params.threads)),
            ("bytes read per token (tensors)", f"{per_token / 1e6:.1f} MB"),
            ("memory read bandwidth (numpy)", f"{bw / 1e9:.2f} GB/s"), ("bandwidth bound", f"{bound:.1f} tok/s"),
            ("llama-cpp-python generation", f"{speed['gen_tps']:.1f} tok/s (median of {s.runs}, tg{s.gen_tokens})"),
            ("ratio measured / bound", f"{speed['gen_tps'] / bound:.2f}")]
    for name, value in rows:
        print(f"{name:<34}{value}")
    if args.doc:
        body = [f"## bench-infer {args.gguf.name}: {machine_stamp(args.doc)}", "",
                f"`python -m tools.bench_infer --gguf {args.gguf}`", "", "| | |", "| --- | --- |",
                *(f"| {name} | {value} |" for name, value in rows)]
        replace_section(args.doc, f"bench-infer {args.gguf.stem}", "\n".join(body), title=DOC_TITLE)


if __name__ == "__main__":
    run_cli(main)
