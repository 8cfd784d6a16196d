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
import re
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
        body = self.with_stops(await _read_body(receive))
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        return await self.app(scope, _replay(body, receive), send)


PATH_LIKE = re.compile(r"(?:[A-Za-z]:)?(?:[/\\\\][\\w.@+-]+){2,}")  # /home/u/x.py, C:\\x\\y: never shown to a client


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> tuple[int, bytes]:
    """An OpenAI-style error body (`{"error": {message, type, param, code}}`), with file paths taken out."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    message = PATH_LIKE.sub("<path>", " ".join(str(message).split()))[:300]
    return status, json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def check_request(path: str, body: bytes) -> tuple[int, bytes] | None:
    """A completion or chat request checked against llama-cpp-python's own request schema before it reaches the
    model: malformed JSON, a body that is not an object, or a field out of range is a 400 naming the field."""
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from pydantic import ValidationError

    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return openai_error(400, f"the request body is not valid JSON ({type(exc).__name__})", code="invalid_json")
    if not isinstance(data, dict):
        return openai_error(400, f"the request body must be a JSON object, got {type(data).__name__}",
                            code="invalid_body")
    schema = CreateChatCompletionRequest if path.endswith("chat/completions") else CreateCompletionRequest
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first.get("loc", ())) or None
        return openai_error(400, f"{field or 'body'}: {first.get('msg', 'invalid')}", param=field,
                            code="invalid_value")
    if path.endswith("chat/completions") and not data.get("messages"):  # the schema defaults it to []
        return openai_error(400, "messages: a chat request needs at least one message", param="messages",
                            code="invalid_value")
    # llama-cpp-python's chat schema takes a negative max_tokens as "until the context is full"; OpenAI's API
    # (and its completions schema) refuse it
    if isinstance(data.get("max_tokens"), int) and data["max_tokens"] < 0:
        return openai_error(400, f"max_tokens: must be >= 0, got {data['max_tokens']}", param="max_tokens",
                            code="invalid_value")
    return None


class OpenAIErrors:
    """ASGI middleware: bad requests are 400s with an OpenAI-style JSON error before the model sees them, and any
    error response or exception from the app leaves as that JSON shape, with no server paths in it."""

    PATHS = DefaultStops.PATHS

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("method") == "POST" and scope.get("path") in self.PATHS:
            body = await _read_body(receive)
            receive = _replay(body, receive)
            refused = check_request(scope["path"], body)
            if refused:
                return await _send_json(send, *refused)
        started, held = False, {}

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held["status"], held["body"] = message["status"], b""  # rewritten once the body is complete
                return None
            if message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return None
                return await _send_json(send, *openai_error(held["status"], _message_of(held["body"])))
            started = True
            return await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:  # the server answers on; the client gets JSON, the log the traceback
            import traceback

            traceback.print_exc()
            if not started:
                await _send_json(send, *openai_error(500, f"internal error ({type(exc).__name__})"))


def _message_of(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace") or "error"
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", "error"))
    return str(data.get("detail", data) if isinstance(data, dict) else data)


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """The app's `receive`: the (possibly rewritten) body once, then the client's own messages, so that a
    disconnect mid-stream still reaches the server (it stops generating)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_app(model: Path, g: GenerateParams, host: str, port: int, stops: list[str]):
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from alpaca_lora_cpu.llama import captured_stderr
    from alpaca_lora_cpu.native import preflight, quiet_aborts

    quiet_aborts()  # the server runs llama.cpp in this process: an abort must end it, not hang in gdb
    preflight(model)  # a build or file that crashes llama.cpp: one line from a child, before the server starts
    with captured_stderr() as log:
        try:
            # interrupt_requests=False: a request that comes while another generates waits its turn instead of
            # cutting the other's stream short (llama-cpp-python's default); requests are served one at a time
            app = create_app(server_settings=ServerSettings(host=host, port=port, interrupt_requests=False),
                             model_settings=[ModelSettings(model=str(model), n_ctx=g.n_ctx, seed=g.seed,
                                                           verbose=False)])
            app.add_middleware(DefaultStops, stops=stops)
            app.add_middleware(OpenAIErrors)  # added last = outermost: it sees the client's body first
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
