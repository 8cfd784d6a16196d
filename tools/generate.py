"""generate / chat: run a GGUF on the CPU with llama-cpp-python (the tutorial's `./main -m … -n 128 -p …`).

Run:
    python -m tools.generate --model models/gguf/finetuned-q4_0.gguf -n 128 \
        --prompt "Building a website can be done in 10 simple steps:"        # one completion (make generate)
    python -m tools.generate --model models/gguf/finetuned-q4_k_m.gguf --chat  # REPL streaming tokens (make chat)

The prompt is wrapped in the training template (`prompt.template`, Alpaca by default) unless `--raw`.
Sampling comes from the `generate` section of params.yaml (temperature 0 = greedy). Chat turns are
independent instructions: the Alpaca format the model was tuned on is single-turn.
A missing, truncated or non-GGUF model file stops with one `error:` line before llama.cpp touches it.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.cli import check_text, make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import GenerateParams, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.prompts import render, stop_sequences


def check_model(path: Path) -> None:
    from alpaca_lora_cpu.gguf_files import check_model_gguf

    if not path.exists():
        built = sorted(p.stem.removeprefix("finetuned-") for p in path.parent.glob("finetuned-*.gguf"))
        raise StageError(f"{path} not found: build it with `make repro` (quantize.types lists the levels), "
                         f"or pick QUANT= from: {', '.join(built) or 'nothing built yet'}")
    check_model_gguf(path)


def completion_text(prompt: str, template: str, raw: bool) -> str:
    if raw or template != "alpaca":
        return prompt
    return render("alpaca", prompt)


def stops_for(llm: Any, template: str, raw: bool, g: GenerateParams) -> list[str]:
    """The project's stop sequences (prompts.stop_sequences); raw text completion keeps only generate.stop."""
    from alpaca_lora_cpu.llama import eos_text

    return stop_sequences("raw" if raw else template, g.stop, end_token=None if raw else eos_text(llm))


def stream(llm: Any, text: str, n: int, g: GenerateParams, stops: list[str]) -> Iterator[str]:
    """Completion pieces as llama.cpp produces them (ends at EOS or a stop sequence)."""
    for chunk in llm.create_completion(text, max_tokens=n, temperature=g.temperature, top_p=g.top_p,
                                       repeat_penalty=g.repeat_penalty, seed=g.seed, stop=stops or None,
                                       stream=True):
        yield chunk["choices"][0]["text"]


def stream_chat(llm: Any, message: str, n: int, g: GenerateParams, stops: list[str]) -> Iterator[str]:
    """`prompt.template: chat`: the GGUF's own chat template renders the turn."""
    for chunk in llm.create_chat_completion([{"role": "user", "content": message}], max_tokens=n,
                                            temperature=g.temperature, top_p=g.top_p,
                                            repeat_penalty=g.repeat_penalty, seed=g.seed, stop=stops or None,
                                            stream=True):
        yield chunk["choices"][0]["delta"].get("content", "") or ""


def fit_new_tokens(n_prompt: int, n: int, n_ctx: int) -> int:
    """How many new tokens fit beside a prompt of `n_prompt` tokens: a prompt that leaves no room is an error;
    one that leaves less than `n` cuts the answer short, with a warning."""
    if n_prompt >= n_ctx:
        raise StageError(f"the prompt is {n_prompt} tokens (with the template) but the context window is {n_ctx} "
                         "(generate.n_ctx in params.yaml): shorten the prompt or raise generate.n_ctx")
    if n_prompt + n > n_ctx:
        print(f"warning: the prompt is {n_prompt} tokens, so only {n_ctx - n_prompt} of the {n} new tokens asked "
              f"fit the context window of {n_ctx} (generate.n_ctx); the answer may be cut short", file=sys.stderr)
        return n_ctx - n_prompt
    return n


def respond(llm: Any, prompt: str, n: int, g: GenerateParams, template: str, raw: bool) -> Iterator[str]:
    """The answer's pieces; a prompt too long for the context is a `StageError` before anything streams."""
    stops = stops_for(llm, template, raw, g)
    if template == "chat" and not raw:
        return _context_errors(stream_chat(llm, prompt, n, g, stops), llm.n_ctx())
    from alpaca_lora_cpu.llama import tokenize

    text = completion_text(prompt, template, raw)
    n_prompt = len(tokenize(llm, text))
    return stream(llm, text, fit_new_tokens(n_prompt, n, llm.n_ctx()), g, stops)


def _context_errors(pieces: Iterator[str], n_ctx: int) -> Iterator[str]:
    """llama-cpp-python's own check, for prompts rendered by the chat template: a one-line error, no traceback."""
    try:
        yield from pieces
    except ValueError as exc:
        if "context window" not in str(exc):
            raise
        raise StageError(f"{exc} (generate.n_ctx in params.yaml is {n_ctx}): shorten the prompt or raise "
                         "generate.n_ctx") from exc


def repl(llm: Any, n: int, g: GenerateParams, template: str, raw: bool) -> None:
    print("Type an instruction; empty line or /exit to quit.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
            check_text("that line", line)
        except EOFError:
            print(file=sys.stderr)
            return
        except (UnicodeDecodeError, StageError) as exc:  # a line that is not UTF-8: say so, keep the session
            print(f"error: {exc if isinstance(exc, StageError) else 'that line is not valid UTF-8 text'}",
                  file=sys.stderr)
            continue
        if not line or line in ("/exit", "/quit"):
            return
        try:
            for piece in respond(llm, line, n, g, template, raw):
                print(piece, end="", flush=True)
        except StageError as exc:  # one bad turn (too long) does not end the session
            print(f"error: {exc}", file=sys.stderr)
            continue
        print()


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "model")
    ap.add_argument("--prompt", help="the instruction (or, with --raw, the exact text) to complete")
    ap.add_argument("-n", "--n-predict", type=int, default=128, help="max new tokens")
    ap.add_argument("--raw", action="store_true", help="no template: complete the prompt text as is")
    ap.add_argument("--chat", action="store_true", help="interactive REPL")
    args = parse_args(ap, argv)
    if not args.chat and not args.prompt:
        raise StageError("give --prompt (make generate PROMPT=\"...\") or --chat")
    if args.n_predict < 1:
        raise StageError(f"-n must be >= 1, got {args.n_predict}")
    params = load_params(args.params)
    g, template = params.generate, params.prompt.template
    check_model(args.model)
    from alpaca_lora_cpu.llama import open_llama

    with open_llama(args.model, n_ctx=g.n_ctx, threads=os.cpu_count() or 1, seed=g.seed) as llm:
        if args.chat:
            repl(llm, args.n_predict, g, template, args.raw)
            return
        for piece in respond(llm, args.prompt, args.n_predict, g, template, args.raw):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    run_cli(main)
