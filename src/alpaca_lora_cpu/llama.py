"""llama.cpp through llama-cpp-python: the one GGUF opener, tokenizing, per-position logits and log-probs, greedy
generation and the speed benchmark (pp512 / tg128 as llama-bench measures them).

    with open_llama(path, n_ctx=512, threads=2, logits_all=True) as llm:
        ids = tokenize(llm, text)
        logits = all_logits(llm, ids)      # (len(ids), vocab) float32, one row per position

Every open validates the file (`gguf_files.check_model_gguf`) and tries it in a child process first
(`native.preflight`), so a damaged file or a build that faults on this CPU is a one-line error. Shared by convert,
quantize, reference, evaluate and the tools; no work at import time.
"""
from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.gguf_files import check_model_gguf
from alpaca_lora_cpu.metrics import log_probs, speed_runs
from alpaca_lora_cpu.native import call_in_child, preflight, quiet_aborts
from alpaca_lora_cpu.tracking import build_record

# A fixed English filler for the speed prompts (llama-bench uses random tokens; content does not change speed).
FILLER = ("The quick brown fox jumps over the lazy dog while the cat watches from the warm window sill. ")


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (where llama.cpp's C code logs) to a temp file; yields a list filled on exit."""
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


@contextlib.contextmanager
def open_llama(path: str | os.PathLike, *, n_ctx: int, threads: int, logits_all: bool = False,
               n_batch: int = 512, seed: int = 0, in_child: bool = False) -> Iterator[Any]:
    """A `llama_cpp.Llama` on a validated GGUF (CPU, quiet, `threads` for both batch and single-token work),
    tried in a child first (unless this already is one: `in_child`, where the parent catches a crash), closed on
    exit (no noisy __del__ at interpreter exit)."""
    check_model_gguf(path)
    quiet_aborts()
    if not in_child:
        preflight(path)
    import llama_cpp

    llm, error = None, None
    with captured_stderr() as log:
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                                  n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=seed)
        except (ValueError, RuntimeError, OSError) as exc:
            error = exc
    if llm is None:
        detail = next((ln for ln in reversed(log) if "error" in ln.lower()), str(error))
        raise StageError(f"llama.cpp cannot load {path}: {detail.strip()[:200]}")
    try:
        yield llm
    finally:
        llm.close()


def tokenize(llm: Any, text: str, *, prompt: bool = True) -> list[int]:
    """Token ids as llama-cpp-python's completion path makes them. A prompt (ours: chat templates' special tokens
    are parsed) gets BOS per the GGUF's add_bos flag; other text (a response, filler) is plain, without BOS."""
    return llm.tokenize(text.encode("utf-8"), add_bos=prompt, special=prompt)


def tokenize_record(llm: Any, prompt: str, response: str, max_response_tokens: int) -> tuple[list[int], int]:
    """(token ids of prompt + response + EOS, number of prompt tokens). Tokenized apart so the prompt/response
    boundary is exact; the response (with EOS) is cut to `max_response_tokens`."""
    prompt_ids = tokenize(llm, prompt)
    response_ids = tokenize(llm, response, prompt=False) + [llm.token_eos()]
    return prompt_ids + response_ids[:max_response_tokens], len(prompt_ids)


def all_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Logits for every position of `ids` (row i predicts token i+1); needs `logits_all=True`."""
    if len(ids) > llm.n_ctx():
        raise StageError(f"{len(ids)} tokens do not fit llama.cpp's context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def response_logits(llm: Any, ids: list[int], n_prompt: int) -> np.ndarray:
    """Logits (rows = response positions) of each position that predicts a response token; row j predicts
    ids[n_prompt + j]. Needs `logits_all=True`."""
    return all_logits(llm, ids)[n_prompt - 1:len(ids) - 1]


def response_log_probs(llm: Any, ids: list[int], n_prompt: int) -> np.ndarray:
    """`response_logits` as log-probs (float64)."""
    return log_probs(response_logits(llm, ids, n_prompt))


def eos_text(llm: Any) -> str:
    """The EOS token as text (e.g. SmolLM2's `<|im_end|>`): the chat template's end-of-turn stop sequence."""
    return llm.detokenize([llm.token_eos()], special=True).decode("utf-8", errors="replace")


def n_params(llm: Any) -> int:
    return int(llm._model.n_params())


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    stopped: bool  # ended with EOS before the token limit


def generate(llm: Any, prompt: str, max_new_tokens: int) -> Generation:
    """Greedy decoding (temperature 0, no repetition penalty) of `prompt`."""
    llm.reset()
    out = llm.create_completion(tokenize(llm, prompt), max_tokens=max_new_tokens, temperature=0.0,
                                repeat_penalty=1.0, top_k=1, seed=0)
    choice = out["choices"][0]
    return Generation(choice["text"], int(out["usage"]["completion_tokens"]), choice["finish_reason"] == "stop")


def filler_tokens(llm: Any, n: int) -> list[int]:
    ids = tokenize(llm, FILLER * (n // 8 + 2), prompt=False)
    if len(ids) < n:
        raise StageError(f"internal: filler gave {len(ids)} tokens, need {n}")
    return ids[:n]


def _bench_in_child(path: str, threads: int, prompt_tokens: int, gen_tokens: int, runs: int) -> dict:
    """Runs in a fresh process, so peak RSS is this model's alone (load + pp + tg)."""
    t0 = time.perf_counter()
    with open_llama(path, threads=threads, n_ctx=prompt_tokens + gen_tokens + 8, n_batch=prompt_tokens) as llm:
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

        return {
            "load_s": load_s,
            **speed_runs(pp, tg, runs),
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
