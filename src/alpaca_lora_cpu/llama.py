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
from collections.abc import Callable, Iterator
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


def generate_many(llm: Any, prompts: list[tuple[str, int]], parallel: int,
                  on_done: Callable[[], object] | None = None) -> list[Generation]:
    """`generate` for each (prompt, max_new_tokens), `parallel` answers decoded together: one llama.cpp batch of one
    token per live answer a step, a finished answer's slot refilled with the next prompt. On a CPU a decode step
    reads every weight once whatever the batch, so the answers share that cost: 2.6× the throughput of one at a
    time at 16 (135M q4_0, 2-core Xeon), more where generation is bandwidth-bound (large models). Each answer is
    its own sequence in a non-unified KV cache, in a context built from the same parameters as `llm`'s, so it is
    the one `generate` gives, token for token, wherever llama.cpp rounds a batch of rows as it rounds one row
    (tests/test_evaluate.py; measured for q8_0 and the q4_0 files). Some types' batch kernels round otherwise,
    and then some answers part after a near-tie (docs/stages.md). `on_done()` is called as each answer ends."""
    toks = [tokenize(llm, p) for p, _ in prompts]
    if not toks:
        return []
    per_seq = -(-max(len(t) + m for t, (_, m) in zip(toks, prompts, strict=True)) // 256) * 256
    with _Decoder(llm, min(parallel, len(toks)), per_seq, on_done or (lambda: None)) as dec:
        done = dec.run(toks, [m for _, m in prompts])
    return [Generation(llm.detokenize(c, prev_tokens=t).decode("utf-8", errors="ignore"), len(c), eos)
            for t, (c, eos) in zip(toks, done, strict=True)]


def sequence_logits(llm: Any, seqs: list[tuple[list[int], int]], max_seqs: int = 32) -> Iterator[np.ndarray]:
    """For each (ids, start), in order, the logits rows that predict ids[start + 1:] (row j predicts
    ids[start + 1 + j]): what `all_logits(llm, ids)[start:-1]` gives, without the rest. Several sequences share
    each llama.cpp batch (up to `llm`'s n_batch tokens), and only the wanted rows reach the LM head and Python: a
    ~120-token record alone left most of a 512-token batch's matmul unused, and the prompt rows' logits were
    computed and copied for nothing. The same packing for the same `seqs`, so reference and evaluate@finetuned
    give the same numbers (tests/test_evaluate.py). A sequence longer than a batch runs alone, in chunks."""
    n_batch = int(llm.context_params.n_batch)
    longest = max((len(ids) for ids, _ in seqs), default=1)
    with _Decoder(llm, max_seqs, -(-max(longest, n_batch) // 256) * 256, unified=True) as dec:
        for group in _packed(seqs, n_batch, max_seqs):
            if len(group) == 1 and len(group[0][0]) > n_batch:
                yield _long_logits(dec, *group[0])
                continue
            dec.clear()
            items = [(t, i, k, start <= i < len(ids) - 1) for k, (ids, start) in enumerate(group)
                     for i, t in enumerate(ids)]
            dec.decode(items)
            out, row = dec.rows(sum(w for *_, w in items)), 0
            for ids, start in group:
                n = max(len(ids) - 1 - start, 0)
                yield out[row:row + n]
                row += n


def _packed(seqs: list[tuple[list[int], int]], n_batch: int, max_seqs: int) -> Iterator[list]:
    """Consecutive runs of `seqs` of at most n_batch tokens and max_seqs sequences (a longer one alone)."""
    group: list = []
    for ids, start in seqs:
        if group and (sum(len(g) for g, _ in group) + len(ids) > n_batch or len(group) == max_seqs):
            yield group
            group = []
        group.append((ids, start))
    if group:
        yield group


def _long_logits(dec: _Decoder, ids: list[int], start: int) -> np.ndarray:
    dec.clear()
    return np.concatenate([dec.rows(n) for n in dec.chunks(0, ids, lambda pos: start <= pos < len(ids) - 1)])


class _Decoder:
    """Greedy decoding of many sequences in one llama.cpp context (`generate_many`'s state)."""

    def __init__(self, llm: Any, slots: int, per_seq: int, on_done: Callable[[], object] = lambda: None,
                 unified: bool = False) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.lib, self.llm, self.slots, self.on_done = llama_cpp, llm, slots, on_done
        params = type(llm.context_params).from_buffer_copy(llm.context_params)  # same attention, threads, types
        # unified: one KV buffer of per_seq cells that the sequences share (scoring: cleared every batch);
        # otherwise each sequence its own per_seq cells (answers: each grows on its own)
        params.n_ctx, params.n_seq_max, params.kv_unified = per_seq * (1 if unified else slots), slots, unified
        self.n_batch = int(params.n_batch)
        with captured_stderr() as log:
            try:
                self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
            except (ValueError, RuntimeError) as exc:
                raise StageError(f"llama.cpp cannot make a context of {slots} × {per_seq} tokens: "
                                 f"{next(iter(log[-1:]), exc)}") from exc
        self.batch = llama_cpp.llama_batch_init(max(self.n_batch, slots), 0, 1)
        self.n_vocab = llm.n_vocab()

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lib.llama_batch_free(self.batch)
        self.ctx.close()

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) items."""
        b = self.batch
        for j, (tok, pos, seq, out) in enumerate(items):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, out
            b.seq_id[j][0] = seq
        b.n_tokens = len(items)
        rc = self.lib.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise StageError(f"llama.cpp decode failed (code {rc}) on a batch of {len(items)} tokens")

    def argmax(self, j: int) -> int:
        """The greedy next token from output row j of the last decode."""
        return int(np.argmax(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx.ctx, j),
                                                   shape=(self.n_vocab,))))

    def rows(self, n: int) -> np.ndarray:
        """A copy of the last decode's n output rows (the tokens it asked logits of, in batch order)."""
        if n == 0:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx.ctx), shape=(n, self.n_vocab)).copy()

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx.ctx), True)

    def prefill(self, seq: int, ids: list[int]) -> int:
        """Clear sequence `seq`, decode `ids` into it; the first answer token."""
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx.ctx), seq, -1, -1)
        for _ in self.chunks(seq, ids, lambda pos: pos == len(ids) - 1):
            pass
        return self.argmax((len(ids) - 1) % self.n_batch)  # the last token's place in the last chunk

    def chunks(self, seq: int, ids: list[int], wants: Callable[[int], bool]) -> Iterator[int]:
        """Decode `ids` into sequence `seq` from position 0, n_batch tokens a decode, with logits at the positions
        `wants`; after each decode, yields how many logits rows it made (read them before the next)."""
        for s in range(0, len(ids), self.n_batch):
            items = [(t, s + i, seq, wants(s + i)) for i, t in enumerate(ids[s:s + self.n_batch])]
            self.decode(items)
            yield sum(w for *_, w in items)

    def run(self, toks: list[list[int]], limits: list[int]) -> list[tuple[list[int], bool]]:
        """(answer tokens, ended with EOS before the limit) per prompt, in prompt order."""
        done: list = [None] * len(toks)
        queue = list(range(len(toks)))
        live: dict[int, list] = {}  # slot → [prompt index, position, answer tokens, next token]
        while queue or live:
            for seq in range(self.slots):
                while seq not in live and queue:
                    k = queue.pop(0)
                    live[seq] = [k, len(toks[k]), [], self.prefill(seq, toks[k])]
                    self._advance(live, seq, limits, done)
            if not live:
                break
            order = sorted(live)
            self.decode([(live[s][3], live[s][1] - 1, s, True) for s in order])
            for j, seq in enumerate(order):
                live[seq][3] = self.argmax(j)
                self._advance(live, seq, limits, done)
        return done

    def _advance(self, live: dict[int, list], seq: int, limits: list[int], done: list) -> None:
        """Takes slot `seq`'s next token as create_completion does: EOS/EOG ends the answer (stopped), otherwise
        it joins the answer, which ends at its limit; a live answer's token is decoded in the next step."""
        k, pos, answer, nxt = live[seq]
        if self.lib.llama_vocab_is_eog(self.llm._model.vocab, nxt):
            done[k] = (answer, True)
        else:
            answer.append(nxt)
            live[seq][1] = pos + 1
            if len(answer) < limits[k]:
                return
            done[k] = (answer, False)
        del live[seq]
        self.on_done()


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
