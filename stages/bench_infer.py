"""bench-infer: llama-cpp-python generation speed of one GGUF against this machine's memory-bandwidth bound.

Run: python -m stages.bench_infer --params params.yaml --gguf models/gguf/model-q4_0.gguf   (make bench-infer QUANT=q4_0)

Generating one token reads (about) every weight once, so generation speed is bounded by
memory bandwidth ÷ bytes read per token. Bytes per token = the GGUF's tensor data (its file size less the
metadata; the token-embedding lookup reads one row, but with tied embeddings the output layer reads the whole
matrix anyway). Bandwidth = the best of several passes summing a 512 MiB array, split over the same threads
(numpy releases the GIL), i.e. a read-only stream like a weight scan. Prints measured tok/s, the bound and
their ratio. Small models can partly sit in the CPU caches, so ratios above 1 are possible.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from stages.config import load_params
from stages.errors import StageError, cli


def memory_bandwidth(threads: int, mib: int = 512, passes: int = 5) -> float:
    """Read bandwidth in bytes/s: best of `passes` parallel sums over a `mib` MiB float64 array."""
    data = np.ones(mib * (1 << 20) // 8)
    chunks = np.array_split(data, threads)
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes + 1):
            start = time.perf_counter()
            list(pool.map(np.sum, chunks))
            times.append(time.perf_counter() - start)
    return data.nbytes / min(times[1:])  # the first pass warms caches and page tables; not counted


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF (what inference reads), from its header."""
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(str(path)).tensors))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--gguf", type=Path, required=True)
    args = ap.parse_args(argv)
    from stages.llama_io import bench

    params = load_params(args.params).evaluate
    if not args.gguf.is_file():
        raise StageError(f"GGUF file {args.gguf} not found (run `make repro`, or pick QUANT= from models/gguf/)")
    s = params.speed
    speed = bench(args.gguf, threads=params.threads, prompt_tokens=s.prompt_tokens, gen_tokens=s.gen_tokens,
                  runs=s.runs)
    bw = memory_bandwidth(params.threads)
    per_token = tensor_bytes(args.gguf)
    bound = bw / per_token
    print(f"{'model':<34}{args.gguf.name}")
    print(f"{'threads':<34}{params.threads}")
    print(f"{'bytes read per token (tensors)':<34}{per_token / 1e6:.1f} MB")
    print(f"{'memory read bandwidth (numpy)':<34}{bw / 1e9:.2f} GB/s")
    print(f"{'bandwidth bound':<34}{bound:.1f} tok/s")
    print(f"{'llama-cpp-python generation':<34}{speed['gen_tps']:.1f} tok/s (median of {s.runs}, tg{s.gen_tokens})")
    print(f"{'ratio measured / bound':<34}{speed['gen_tps'] / bound:.2f}")


if __name__ == "__main__":
    cli(main)
