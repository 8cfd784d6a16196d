"""What this machine can do, measured, never read off a CPU's name: torch's fp32 and bf16 matmul GFLOP/s, memory
read bandwidth, and llama.cpp's quantizing, prompt and generation throughput on a synthetic model made on the
spot. The cost plan (alpaca_lora_cpu/cost.py) turns these into predicted stage times; `make plan` and the
benchmarks measure, no stage does (the memory a stage may use is alpaca_lora_cpu/memory.py's).

    rates(threads)         the measured rates, cached in <venv>/machine.json per CPU, flags, threads and llama.cpp
                           build (about 10 s the first time)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CACHE = Path(sys.prefix) / "machine.json"


# ---------------------------------------------------------------- measured rates

def bandwidth(threads: int, mib: int = 2048, passes: int = 3) -> float:
    """Read bandwidth in bytes/s: best of `passes` parallel sums over a `mib` MiB float64 array (larger than any
    CPU cache, so it is the memory's, as a large model's weight scan sees it)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(mib * (1 << 20) // 8)
    chunks = np.array_split(data, threads)
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes + 1):
            start = time.perf_counter()
            list(pool.map(np.sum, chunks))
            times.append(time.perf_counter() - start)
    return data.nbytes / min(times[1:])  # the first pass warms caches and page tables; not counted


def _synthetic_gguf(path: Path, hidden: int = 1024, ffn: int = 2816, layers: int = 4, vocab: int = 1024) -> int:
    """A random LLaMA GGUF (f16) big enough that llama.cpp's matmuls, not its overheads, set the pace; its
    parameter count."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    heads = hidden // 64
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)),
              *(f"▁w{i}" for i in range(vocab - 259))]
    for add, value in ((writer.add_context_length, 1024), (writer.add_embedding_length, hidden),
                       (writer.add_block_count, layers), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, heads),
                       (writer.add_rope_dimension_count, 64), (writer.add_layer_norm_rms_eps, 1e-5),
                       (writer.add_tokenizer_model, "llama"), (writer.add_token_list, tokens),
                       (writer.add_token_scores, [0.0] * vocab),
                       (writer.add_token_types, [2, 3, 3] + [1] * (vocab - 3)),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2)):
        add(value)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float16)

    n = 0
    tensors = [("token_embd.weight", w(vocab, hidden)), ("output_norm.weight", np.ones(hidden, np.float32)),
               ("output.weight", w(vocab, hidden))]
    for b in range(layers):
        tensors += [(f"blk.{b}.attn_norm.weight", np.ones(hidden, np.float32)),
                    (f"blk.{b}.ffn_norm.weight", np.ones(hidden, np.float32)),
                    *((f"blk.{b}.attn_{x}.weight", w(hidden, hidden)) for x in ("q", "k", "v", "output")),
                    (f"blk.{b}.ffn_gate.weight", w(ffn, hidden)), (f"blk.{b}.ffn_up.weight", w(ffn, hidden)),
                    (f"blk.{b}.ffn_down.weight", w(hidden, ffn))]
    for name, arr in tensors:
        writer.add_tensor(name, arr)
        n += arr.size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n


def _llama_rates(folder: str, threads: int) -> dict:
    """In a child: quantize the synthetic model to q4_0 and q8_0; time quantizing, and prompt processing and
    single-token generation of those and of the f16 original."""
    from alpaca_lora_cpu.llama import open_llama
    from alpaca_lora_cpu.quantizer import Plan, quantize_here

    src = Path(folder) / "synthetic-f16.gguf"
    params = _synthetic_gguf(src)
    out: dict[str, float] = {"synthetic_params": params}
    for qtype in ("f16", "q4_0", "q8_0"):
        dst = Path(folder) / f"synthetic-{qtype}.gguf"
        if qtype != "f16":
            rc, seconds, _ = quantize_here(str(src), str(dst), Plan(qtype, qtype, False), threads)
            if rc != 0:
                raise RuntimeError(f"quantizing the synthetic model to {qtype} failed")
            out[f"quantize_{qtype}_params_per_s"] = params / seconds
        with open_llama(dst, n_ctx=512, threads=threads, n_batch=256) as llm:
            ids = [(7 * i + 11) % 1000 + 3 for i in range(256)]
            llm.eval(ids[:8])  # warm-up: page the weights in
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            out[f"pp_{qtype}_gflops"] = 2 * params * len(ids) / (time.perf_counter() - t0) / 1e9
            llm.reset()
            llm.eval(ids[:1])
            t0 = time.perf_counter()
            for tok in ids[1:33]:
                llm.eval([tok])
            out[f"tg_{qtype}_bytes_per_s"] = dst.stat().st_size * 32 / (time.perf_counter() - t0)
    return out


def measure(threads: int) -> dict:
    """Every rate, measured now (about 20 s on 2 cores)."""
    import tempfile

    import torch

    from alpaca_lora_cpu.native import call_in_child
    from alpaca_lora_cpu.training import matmul_gflops

    torch.set_num_threads(threads)
    shape = {"rows": 512, "inner": 2048, "cols": 2048}  # a large model's matmul, a few hundred tokens at a time
    with tempfile.TemporaryDirectory() as tmp:
        llama = call_in_child(_llama_rates, tmp, threads, action="measuring llama.cpp's speed")
    return {"threads": threads, "fp32_gflops": matmul_gflops("fp32", **shape),
            "bf16_gflops": matmul_gflops("bf16", **shape), "bandwidth_bytes_per_s": bandwidth(threads), **llama}


def _key(threads: int) -> str:
    from alpaca_lora_cpu.cpu import read as read_cpu
    from alpaca_lora_cpu.tracking import build_record

    cpu = read_cpu()
    return json.dumps([cpu.model, sorted(cpu.flags), threads, build_record().get("llama_cmake_args")])


def rates(threads: int, refresh: bool = False) -> dict:
    """The measured rates for `threads` threads on this machine, from the cache when it has them."""
    key = _key(threads)
    try:
        cached = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        cached = {}
    if refresh or key not in cached:
        cached[key] = {**measure(threads), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        try:
            CACHE.write_text(json.dumps(cached, indent=1) + "\n")
        except OSError:
            pass  # a read-only venv: measure again next time
    return cached[key]
