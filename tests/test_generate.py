"""generate / chat / serve: completions from a GGUF; damaged files are one-line errors, never a crash."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import ROOT, run_module

from alpaca_lora_cpu.launch import free_port
from tools.generate import completion_text

# Runs entry points as subprocesses / converts and quantizes models: `make test`, not `make test-fast`.
pytestmark = pytest.mark.slow


def test_alpaca_template_unless_raw():
    assert completion_text("Say hi", "alpaca", raw=False).endswith("### Instruction:\nSay hi\n\n### Response:\n")
    assert completion_text("Say hi", "alpaca", raw=True) == "Say hi"


def test_generate_prints_a_completion(tiny_gguf):
    proc = run_module("tools.generate", "--model", str(tiny_gguf), "-n", "8", "--prompt", "List three colors.")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout) > 1  # random tiny weights: generated pieces (often newlines) + the final newline


def test_chat_repl_streams_and_exits_on_eof(tiny_gguf):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.generate", "--model", str(tiny_gguf), "--chat", "-n", "4"],
        cwd=ROOT, input="Name a fruit.\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(">>> ") == 2 and len(proc.stdout.replace(">>> ", "")) > 1


@pytest.mark.parametrize("module", ["tools.generate", "tools.serve"])
@pytest.mark.parametrize("damage", ["truncated", "not_gguf", "missing"])
def test_damaged_model_is_one_line_error(tmp_path, tiny_gguf, module, damage):
    bad = tmp_path / "finetuned-q4_0.gguf"
    data = tiny_gguf.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 3])
    elif damage == "not_gguf":
        bad.write_text("<html>404 Not Found</html>")
    args = ["--model", str(bad)] + (["--prompt", "hi"] if module == "tools.generate" else ["--port", "1"])
    proc = run_module(module, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_serve_answers_openai_requests_on_loopback(tiny_gguf):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", "--model", str(tiny_gguf), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
                time.sleep(1)
        assert "tiny-f16.gguf" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prompt_longer_than_the_context_is_one_line_error(tiny_gguf):
    proc = run_module("tools.generate", "--model", str(tiny_gguf), "-n", "8", "--prompt", "word " * 3000)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: the prompt is ") and "context window is 2048" in lines[0]
    assert "generate.n_ctx" in lines[0]


def test_prompt_leaving_less_room_than_n_warns_and_cuts_the_answer(tiny_gguf):
    from tools.generate import fit_new_tokens

    assert fit_new_tokens(100, 50, 2048) == 50
    assert fit_new_tokens(2000, 200, 2048) == 48
    proc = run_module("tools.generate", "--model", str(tiny_gguf), "-n", "200", "--prompt", "word " * 1900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the prompt is " in proc.stderr and "fit the context window of 2048" in proc.stderr


def test_serve_on_a_busy_port_fails_before_loading_the_model(tiny_gguf):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_module("tools.serve", "--model", str(tiny_gguf), "--port", str(port), timeout=120,
                          env={"LLAMA_CHILD_FAULT": "SIGILL"})  # the model must not even be tried
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}"), lines
    assert "PORT=" in lines[0] and "serving" not in proc.stdout


def test_serve_adds_the_project_stops_to_requests_that_name_none():
    """The middleware in front of llama-cpp-python's server, with a stand-in app that records what it got."""
    import asyncio
    import json

    from tools.serve import DefaultStops

    seen = []

    async def app(scope, receive, send):
        message = await receive()
        seen.append((scope["path"], dict(scope["headers"]).get(b"content-length"), message["body"]))

    async def call(path: str, body: dict) -> dict:
        raw = json.dumps(body).encode()
        chunks = [{"type": "http.request", "body": raw[:5], "more_body": True},
                  {"type": "http.request", "body": raw[5:], "more_body": False}]

        async def receive():
            return chunks.pop(0)

        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"0")]}
        await DefaultStops(app, ["### Instruction:", "<|im_end|>"])(scope, receive, None)
        path_seen, length, got = seen[-1]
        assert int(length) == len(got)
        return json.loads(got)

    assert asyncio.run(call("/v1/completions", {"prompt": "Hi"}))["stop"] == ["### Instruction:", "<|im_end|>"]
    assert asyncio.run(call("/v1/chat/completions", {"messages": []}))["stop"] == ["### Instruction:", "<|im_end|>"]
    assert asyncio.run(call("/v1/completions", {"prompt": "Hi", "stop": ["\n"]}))["stop"] == ["\n"]  # client's own
