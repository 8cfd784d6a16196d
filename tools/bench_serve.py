"""bench-serve: a bounded load test of `make serve` (tools/serve.py) on 127.0.0.1: latency p50/p95 and errors.

Run: make bench-serve [QUANT=q4_0] [SERVE_REQUESTS=50] [SERVE_CONCURRENCY=4]
     (or: python -m tools.bench_serve --gguf models/gguf/finetuned-q4_0.gguf --requests 50 --concurrency 4
          --doc docs/benchmarks.md)

Starts the real server in a child process on a free loopback port, sends `--requests` completion requests
(`--max-tokens` each, greedy, Alpaca prompts) from `--concurrency` client threads with a plain HTTP client, and
reports each request's wall latency (queueing included: the server answers one request at a time) and any
non-200 answer. Nothing leaves the machine.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import load_params
from alpaca_lora_cpu.errors import StageError
from tools.bench_doc import DOC_TITLE, machine_stamp, replace_section

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
           "Write a haiku about autumn.", "Explain what a neural network is in one sentence."]


@contextlib.contextmanager
def running_server(gguf: Path, port: int, params: str = "params.yaml", timeout: float = 180) -> Iterator[str]:
    """tools.serve on 127.0.0.1:`port` in a child process; yields its base URL once /v1/models answers."""
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", "--params", params, "--model", str(gguf),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise StageError(f"the server exited ({proc.returncode}): "
                                     f"{(proc.stdout.read() or '').strip().splitlines()[-1:]}") from None
                if time.time() > deadline:
                    raise StageError(f"the server did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(url: str, path: str, body: bytes | dict, timeout: float = 300) -> tuple[int, dict | str]:
    """One POST; (status, parsed JSON body or raw text). HTTP errors are returned, not raised."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def load(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """`requests` completions from `concurrency` threads: latencies (s), errors, wall time."""
    def one(i: int) -> tuple[float, int]:
        body = {"prompt": f"### Instruction:\n{PROMPTS[i % len(PROMPTS)]}\n\n### Response:\n",
                "max_tokens": max_tokens, "temperature": 0}
        t0 = time.perf_counter()
        status, _ = post(url, "/v1/completions", body)
        return time.perf_counter() - t0, status

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "wall_s": wall,
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "max_s": lat[-1], "errors": sum(r[1] != 200 for r in results), "requests_per_s": requests / wall}


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "gguf")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--doc", type=Path, help="also write the result as a stamped section of this Markdown file")
    args = parse_args(ap, argv)
    load_params(args.params)  # checked whole here, as the server will check it
    if not args.gguf.is_file():
        raise StageError(f"GGUF file {args.gguf} not found (run `make repro`, or pick QUANT= from models/gguf/)")
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        raise StageError("--requests, --concurrency and --max-tokens must be at least 1")
    from alpaca_lora_cpu.launch import free_port

    with running_server(args.gguf, free_port(), args.params) as url:
        r = load(url, args.requests, args.concurrency, args.max_tokens)
    rows = [("model", args.gguf.name), ("requests × concurrent clients", f"{r['requests']} × {r['concurrency']}"),
            ("max_tokens per request", str(r["max_tokens"])), ("latency p50", f"{r['p50_s']:.2f} s"),
            ("latency p95", f"{r['p95_s']:.2f} s"), ("latency max", f"{r['max_s']:.2f} s"),
            ("throughput", f"{r['requests_per_s']:.2f} requests/s ({r['wall_s']:.1f} s in all)"),
            ("errors (non-200)", str(r["errors"]))]
    for name, value in rows:
        print(f"{name:<32}{value}")
    if args.doc:
        body = [f"## bench-serve {args.gguf.name}: {machine_stamp(args.doc)}", "",
                f"`python -m tools.bench_serve --gguf {args.gguf} --requests {r['requests']} "
                f"--concurrency {r['concurrency']} --max-tokens {r['max_tokens']}`", "",
                "Latency is per request, wall clock at the client, queueing included: the server generates for one "
                "request at a time (tools/serve.py), so with 4 clients a request mostly waits for the 3 ahead of it.",
                "", "| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)]
        replace_section(args.doc, f"bench-serve {args.gguf.stem}", "\n".join(body), title=DOC_TITLE)
    if r["errors"]:
        raise StageError(f"{r['errors']} of {r['requests']} requests did not get HTTP 200")


if __name__ == "__main__":
    run_cli(main)
