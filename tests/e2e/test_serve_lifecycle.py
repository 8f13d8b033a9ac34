"""A real `tprun serve` process on a tiny model: how it starts, stops and fails.

SIGTERM with streams in flight, a port already in use, a rank killed mid-stream, and a bad
character on a keep-alive connection — each reproduced against the process users run.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from converter.convert import ConvertOptions, convert
from tests.e2e.server import ROOT, Server

EXIT_WAIT_S = 60  # the bound for a server to end after a fault


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    """tp -> a workspace of a tiny random Llama (real tokenizer and chat template)."""
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("lifecycle")
    src = make_tiny(root / "src", "llama", vocab=301, seed=3)
    return {tp: convert(ConvertOptions(src, root / f"tp{tp}", tp)) and root / f"tp{tp}" for tp in (1, 2)}


def _stream(url: str, out: list, max_tokens: int, first: threading.Event) -> None:
    """One streaming completion; appends every event (``[DONE]`` as the string) to ``out``."""
    body = {"prompt": "hello there", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    out.append(data if data == "[DONE]" else json.loads(data))
                    first.set()
    except httpx.HTTPError as e:  # recorded, so that the test names what went wrong
        out.append(e)
    finally:
        first.set()


def _start_streams(url: str, count: int, max_tokens: int) -> tuple[list, list[threading.Thread]]:
    outs, threads = [[] for _ in range(count)], []
    for out in outs:
        first = threading.Event()
        t = threading.Thread(target=_stream, args=(url, out, max_tokens, first))
        t.start()
        first.wait(60)
        threads.append(t)
    return outs, threads


def _finish_reasons(events: list) -> list:
    return [e["choices"][0]["finish_reason"] for e in events
            if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]]


@contextlib.contextmanager
def serving(ws, *args: str):
    """A server that is closed whatever happens, so a failing test leaves no process behind."""
    server = Server(ws, *args)
    try:
        yield server
    finally:
        server.close()


def _wait_exit(server: Server) -> int:
    try:
        return server.proc.wait(timeout=EXIT_WAIT_S)
    finally:
        server.close()


def test_sigterm_lets_streams_in_flight_finish_and_exits_0(tiny_ws):
    with serving(tiny_ws[1], "--shutdown-timeout", "60", "--max-model-len", "2048") as server:
        outs, threads = _start_streams(server.url, 3, 1500)  # seconds of work: still running at SIGTERM
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, timeout=10)
        health = httpx.get(f"{server.url}/health", timeout=10).status_code
        for t in threads:
            t.join(EXIT_WAIT_S)
        code = _wait_exit(server)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert health == 503
        for out in outs:  # every stream ran to its end: 1500 tokens, a reason, [DONE]
            assert out[-1] == "[DONE]" and _finish_reasons(out) == ["length"], out[-3:]
        assert code == 0, server.log
        assert "Traceback" not in server.log and "stopped" in server.log


def test_sigterm_past_the_shutdown_timeout_ends_streams_with_an_error(tiny_ws):
    with serving(tiny_ws[1], "--shutdown-timeout", "0.5", "--max-model-len", "2048") as server:
        outs, threads = _start_streams(server.url, 2, 2000)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(EXIT_WAIT_S)
        code = _wait_exit(server)
        for out in outs:
            error = next(e for e in out if isinstance(e, dict) and "error" in e)
            assert "shutdown-timeout" in error["error"]["message"]
            assert out[-1] == "[DONE]" and _finish_reasons(out) == ["error"]
        assert code == 0 and "Traceback" not in server.log, server.log


def test_a_port_in_use_fails_before_loading(tiny_ws):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "runtime", "serve", str(tiny_ws[1]), "--device", "cpu",
                            "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "KV cache" not in r.stderr and "serving" not in r.stderr  # nothing was loaded
    assert time.monotonic() - t0 < 30


def test_a_killed_rank_ends_every_stream_with_its_name_and_the_server_exits(tiny_ws):
    with serving(tiny_ws[2], "--max-model-len", "2048") as server:
        outs, threads = _start_streams(server.url, 3, 2000)
        rank1 = psutil.Process(server.proc.pid).children(recursive=True)
        workers = [p for p in rank1 if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 1, [p.cmdline() for p in rank1]
        os.kill(workers[0].pid, signal.SIGKILL)
        for t in threads:
            t.join(EXIT_WAIT_S)
        code = _wait_exit(server)
        for out in outs:
            error = next(e for e in out if isinstance(e, dict) and "error" in e)
            assert "rank 1 exited unexpectedly" in error["error"]["message"], error
            assert "gloo" not in error["error"]["message"].lower()
            assert out[-1] == "[DONE]" and _finish_reasons(out) == ["error"]
        assert code == 70, server.log


def test_a_lone_surrogate_is_a_400_and_the_connection_stays_usable(tiny_ws):
    server = Server(tiny_ws[1])
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:  # one keep-alive connection
            raw = b'{"messages": [{"role": "user", "content": "hi \\udfff"}], "max_tokens": 2}'
            r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
    finally:
        server.close()
