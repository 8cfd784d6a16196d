"""serve: llama-cpp-python's OpenAI-compatible server on a GGUF, bound to 127.0.0.1 (make serve).

Run: python -m tools.serve --model models/gguf/finetuned-q4_k_m.gguf [--port 8000]
Then: curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
          -d '{"prompt": "...", "max_tokens": 64}'
The file is validated first (a truncated or non-GGUF file is one `error:` line, not a crash), then tried in
llama.cpp in a child process, and the port is checked free before the model loads; `n_ctx` and the
seed come from the `generate` section of params.yaml. Only loopback by default: pass --host to expose it.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import GenerateParams, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.gguf_files import check_gguf, eos_text
from alpaca_lora_cpu.prompts import stop_sequences
from tools.generate import check_model


def check_port(host: str, port: int) -> None:
    """Bind the address once before the model loads: a busy port is one line now, not an error buried in
    uvicorn's shutdown log after the load."""
    if not 0 < port < 65536:
        raise StageError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a TIME_WAIT port is free
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StageError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server running? "
                             f"stop it or pick another port: make serve PORT={port + 1})") from exc


class DefaultStops:
    """ASGI middleware: a completion or chat request that names no `stop` gets the project's stop sequences
    (prompts.stop_sequences), so answers end where `make generate` and the evaluation end them."""

    PATHS = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, stops: list[str]):
        self.app, self.stops = app, stops

    def with_stops(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body  # not JSON: the server's own validation answers
        if isinstance(data, dict) and data.get("stop") is None:
            data["stop"] = self.stops
            return json.dumps(data).encode()
        return body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = self.with_stops(b"".join(chunks))
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def build_app(model: Path, g: GenerateParams, host: str, port: int, stops: list[str]):
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from alpaca_lora_cpu.llama import captured_stderr
    from alpaca_lora_cpu.native import preflight

    preflight(model)  # a build or file that crashes llama.cpp: one line from a child, before the server starts
    with captured_stderr() as log:
        try:
            app = create_app(server_settings=ServerSettings(host=host, port=port),
                             model_settings=[ModelSettings(model=str(model), n_ctx=g.n_ctx, seed=g.seed,
                                                           verbose=False)])
            app.add_middleware(DefaultStops, stops=stops)
            return app
        except (ValueError, RuntimeError, OSError) as exc:
            error = exc
    raise StageError(f"llama.cpp cannot load {model}: {next(iter(log[-1:]), str(error)).strip()[:200]}")


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "model")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = parse_args(ap, argv)
    params = load_params(args.params)
    g = params.generate
    check_model(args.model)
    check_port(args.host, args.port)
    stops = stop_sequences(params.prompt.template, g.stop, end_token=eos_text(check_gguf(args.model)))
    app = build_app(args.model, g, args.host, args.port, stops)
    import uvicorn

    print(f"serving {args.model} on http://{args.host}:{args.port}/v1 (OpenAI API; docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    run_cli(main)
