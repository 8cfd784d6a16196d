"""GGUF inference helpers on llama-cpp-python: open a model, tokenize a record, per-position log-probs,
greedy generation, and the speed benchmark (pp512 / tg128 as llama-bench measures them).

Shared by the `reference` and `evaluate` stages and `make bench-infer`; no work at import time.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import StageError
from stages.gguf_io import check_gguf
from stages.metrics import log_probs
from stages.native import call_in_child, preflight
from stages.tracking import build_record

# A fixed English filler for the speed prompts (llama-bench uses random tokens; content does not change speed).
FILLER = ("The quick brown fox jumps over the lazy dog while the cat watches from the warm window sill. ")


def open_gguf(path: str | Path, *, threads: int, n_ctx: int = 2048, logits_all: bool = False,
              n_batch: int = 512) -> Any:
    """A llama_cpp.Llama on `path` (CPU, fixed threads, quiet); StageError when the file is missing or bad."""
    from llama_cpp import Llama

    path = Path(path)
    check_gguf(path)  # missing, truncated or non-GGUF files: one-line errors, never a crash inside llama.cpp
    preflight(path)   # a build or file that crashes llama.cpp: a one-line error from a child, not a dead stage
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0)
    except (ValueError, RuntimeError) as exc:
        raise StageError(f"GGUF file {path}: llama.cpp cannot load it ({exc})") from exc


def n_params(llm: Any) -> int:
    return int(llm._model.n_params())


def tokenize_record(llm: Any, prompt: str, response: str, max_response_tokens: int) -> tuple[list[int], int]:
    """(token ids of prompt + response + EOS, number of prompt tokens). The prompt is ours, so its special
    tokens (chat templates) are parsed; the response is plain text. Tokenized apart so the prompt/response
    boundary is exact; the response (with EOS) is cut to `max_response_tokens`."""
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    response_ids = llm.tokenize(response.encode("utf-8"), add_bos=False, special=False) + [llm.token_eos()]
    return prompt_ids + response_ids[:max_response_tokens], len(prompt_ids)


def response_log_probs(llm: Any, ids: list[int], n_prompt: int) -> np.ndarray:
    """Log-probs (float64, rows = response positions) of the model's next-token distribution at each position
    that predicts a response token; row j predicts ids[n_prompt + j]. Needs `logits_all=True`."""
    if len(ids) > llm.n_ctx():
        raise StageError(f"a record of {len(ids)} tokens exceeds the context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    return log_probs(llm.scores[n_prompt - 1:len(ids) - 1])


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    stopped: bool  # ended with EOS before the token limit


def generate(llm: Any, prompt: str, max_new_tokens: int) -> Generation:
    """Greedy decoding (temperature 0, no repetition penalty) of `prompt`."""
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, repeat_penalty=1.0,
                                top_k=1, seed=0)
    choice = out["choices"][0]
    return Generation(choice["text"], int(out["usage"]["completion_tokens"]), choice["finish_reason"] == "stop")


def filler_tokens(llm: Any, n: int) -> list[int]:
    text = FILLER * (n // 8 + 2)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if len(ids) < n:
        raise StageError(f"internal: filler gave {len(ids)} tokens, need {n}")
    return ids[:n]


def _bench_in_child(path: str, threads: int, prompt_tokens: int, gen_tokens: int, runs: int) -> dict:
    """Runs in a fresh process, so peak RSS is this model's alone (load + pp + tg)."""
    t0 = time.perf_counter()
    llm = open_gguf(path, threads=threads, n_ctx=prompt_tokens + gen_tokens + 8, n_batch=prompt_tokens)
    load_s = time.perf_counter() - t0
    ids = filler_tokens(llm, prompt_tokens + gen_tokens)

    def pp() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:prompt_tokens])
        return prompt_tokens / (time.perf_counter() - start)

    def tg() -> float:
        # One token at a time from an (almost) empty context, like llama-bench's tg<n>.
        llm.reset()
        llm.eval(ids[:1])
        start = time.perf_counter()
        for tok in ids[1:gen_tokens + 1]:
            llm.eval([tok])
        return gen_tokens / (time.perf_counter() - start)

    pp(), tg()  # warm-up: page in the weights, size the buffers
    pp_runs = [pp() for _ in range(runs)]
    tg_runs = [tg() for _ in range(runs)]
    return {
        "load_s": load_s,
        "prompt_tps": statistics.median(pp_runs),
        "gen_tps": statistics.median(tg_runs),
        "prompt_tps_runs": pp_runs,
        "gen_tps_runs": tg_runs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "n_params": n_params(llm),
        "tensor_bytes": int(llm._model.size()),  # weights only, as llama.cpp counts model size / BPW
    }


def bench(path: str | Path, *, threads: int, prompt_tokens: int, gen_tokens: int, runs: int) -> dict:
    """Speed of one GGUF in a fresh process: load time, prompt tok/s and generation tok/s (medians of `runs`
    after a warm-up), peak RSS, with `threads` fixed."""
    if not Path(path).is_file():
        raise StageError(f"GGUF file {path} not found")
    # A fresh process, so peak RSS is this model's alone; a native crash there is a one-line NativeCrash here.
    result = call_in_child(_bench_in_child, str(path), threads, prompt_tokens, gen_tokens, runs, file=path,
                           action="benchmarking")
    return {**result, "threads": threads, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "runs": runs,
            "file_size_bytes": os.path.getsize(path)}


def system_info() -> dict:
    """The llama.cpp build inside llama-cpp-python: version, the CMake flags `make setup` chose, and the CPU
    features it reports."""
    import llama_cpp

    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_version": llama_cpp.llama_version().decode(),
        **{k: v for k, v in build_record().items() if k != "llama_build_system_info"},  # the live one is below
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }
