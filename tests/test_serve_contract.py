"""The OpenAI-compatible server's contract, with a real HTTP client against the real server on 127.0.0.1: bad
requests are 4xx with an OpenAI-style JSON error that names the field and leaks no path, the server answers on
afterwards, concurrent requests are served one after another (none cut short), and a client that disconnects
mid-stream frees the model for the next request."""
from __future__ import annotations

import http.client
import json
import threading

import pytest
from helpers import ROOT

from alpaca_lora_cpu.launch import free_port
from tools.bench_serve import load, post, running_server

pytestmark = pytest.mark.slow  # one server process for the module (a few seconds to start on the tiny model)

OK = {"prompt": "### Instruction:\nSay hi.\n\n### Response:\n", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_gguf):
    with running_server(tiny_gguf, free_port(), str(ROOT / "params.yaml")) as url:
        yield url


def assert_openai_error(status: int, body, code: int, param: str | None = None) -> dict:
    assert status == code, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert "/" not in err["message"] and "\\" not in err["message"], err  # no server paths
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "hi", "max_tokens": ', None),          # truncated JSON
    (b"\xff\xfe not utf-8", None),
    (b"[1, 2, 3]", None),                                # a JSON list
    (b'"just a string"', None),
    (b"", None),
    (json.dumps({"prompt": "hi", "max_tokens": -5}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": "many"}).encode(), "max_tokens"),
    (json.dumps({"prompt": 42}).encode(), None),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "temperature"),
])
def test_a_bad_completion_request_is_a_400_with_an_openai_error(server, body, param):
    status, answer = post(server, "/v1/completions", body)
    assert_openai_error(status, answer, 400, param)
    status, answer = post(server, "/v1/completions", OK)  # and the server answers on
    assert status == 200 and answer["choices"][0]["text"] is not None, answer


@pytest.mark.parametrize("body, param", [
    (json.dumps({"messages": "hello"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).encode(), "max_tokens"),
    (b"{}", "messages"),
])
def test_a_bad_chat_request_is_a_400_naming_the_field(server, body, param):
    status, answer = post(server, "/v1/chat/completions", body)
    assert_openai_error(status, answer, 400, param)


def test_a_good_chat_request_still_answers(server):
    status, answer = post(server, "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8})
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant", answer


def test_an_unknown_route_is_a_404_json_error(server):
    status, answer = post(server, "/v1/nothing-here", OK)
    assert status == 404 and isinstance(answer, dict) and "error" in answer, answer


def test_concurrent_requests_are_all_answered_in_full(server):
    """Four clients at once: the server generates for one at a time, and none is interrupted by the others."""
    results = load(server, requests=8, concurrency=4, max_tokens=16)
    assert results["errors"] == 0 and results["p95_s"] >= results["p50_s"] > 0, results

    answers: list[dict] = []

    def ask():
        answers.append(post(server, "/v1/completions", {**OK, "max_tokens": 24, "stream": False})[1])

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(answers) == 3 and all(a["choices"][0]["finish_reason"] in ("stop", "length") for a in answers)
    assert len({a["choices"][0]["text"] for a in answers}) == 1  # greedy: same prompt, same full answer


def test_a_client_that_disconnects_mid_stream_frees_the_model(server):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**OK, "max_tokens": 200, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read1(256)  # the first server-sent event (http.client undoes the chunked encoding)
    assert b"data: " in first, first
    conn.sock.close()  # gone mid-stream
    conn.close()
    status, answer = post(server, "/v1/completions", OK, timeout=120)
    assert status == 200 and answer["choices"], answer
