"""Request features and the server's lifecycle at the HTTP layer (fake engine): bad Unicode, echo,
prompt lists, continue_final_message, /version and /ping, draining and in-band errors."""
from __future__ import annotations

import threading
import time

import pytest
from starlette.testclient import TestClient

from runtime import __version__
from runtime.serve.app import create_app
from runtime.serve.contract import ServiceUnavailable
from runtime.serve.metrics import Metrics
from runtime.serve.middleware import Lifecycle
from tests.runtime.serve.conftest import KEY, MODEL
from tests.runtime.serve.test_app import HELLO, error_of, events, only_request

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


# ---------------------------------------------------------------------------------- bad unicode
@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", b'{"prompt": "a\\udfff"}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\ud800y"}]}',
     "messages[0].content"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\udc00"]}', "stop[0]"),
], ids=["prompt", "message", "stop"])
def test_lone_surrogate_is_a_400_and_the_connection_stays_usable(http, path, raw, param):
    err = error_of(http.post(path, content=raw, headers=AUTH), 400)
    assert "surrogate" in err["message"] and param in err["message"]
    assert err["type"] == "invalid_request_error"
    # the same client (one keep-alive connection) is served normally right after
    r = http.post("/v1/completions", json={"prompt": "ab"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ba"


# ---------------------------------------------------------------------------- completion features
def test_echo_prepends_the_prompt(client, http):
    r = client.completions.create(model=MODEL, prompt="abc", echo=True)
    assert r.choices[0].text == "abccba"
    r = client.completions.create(model=MODEL, prompt=[104, 105], echo=True, max_tokens=1)
    assert r.choices[0].text == "hii"
    streamed = events(http, "/v1/completions", dict(prompt="abc", echo=True, stream=True))
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == "abccba"


def test_a_list_of_prompts_fans_out_into_choices(client, engine, http):
    r = client.completions.create(model=MODEL, prompt=["ab", "xyz"], n=2, max_tokens=2)
    texts = [(c.index, c.text) for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts == [(0, "ba"), (1, "a"), (2, "zy"), (3, "yx")]  # prompt-major, n per prompt
    assert len(engine.requests) == 2
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3 + 4, 2 + 1 + 2 + 2)
    got: dict[int, str] = {}
    for e in events(http, "/v1/completions", dict(prompt=["ab", [120, 121]], stream=True))[:-1]:
        for c in e["choices"]:
            got[c["index"]] = got.get(c["index"], "") + c["text"]
    assert got == {0: "ba", 1: "yx"}


def test_a_refused_prompt_in_a_list_refuses_the_request(http, engine):
    body = {"prompt": ["ab", "x" * 300], "max_tokens": 1}
    err = error_of(http.post("/v1/completions", json=body, headers=AUTH), 400)
    assert err["code"] == "context_length_exceeded"


def test_continue_final_message(client, engine):
    messages = [*HELLO, {"role": "assistant", "content": "The answer"}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                   extra_body=dict(continue_final_message=True, add_generation_prompt=False))
    prompt, _ = only_request(engine)
    assert engine.tokenizer.decode(prompt) == "<user>hello</><assistant>The answer"  # no end of turn


@pytest.mark.parametrize("extra, words", [
    (dict(continue_final_message=True), "add_generation_prompt: false"),
    (dict(continue_final_message=True, add_generation_prompt=False), "assistant message"),
])
def test_continue_final_message_errors(http, extra, words):
    body = {"messages": HELLO, **extra}
    assert words in error_of(http.post("/v1/chat/completions", json=body, headers=AUTH), 400)["message"]


def test_penalties_and_min_tokens_reach_the_engine(client, engine):
    client.completions.create(model=MODEL, prompt="hi", presence_penalty=0.5, frequency_penalty=-0.25,
                              extra_body=dict(min_tokens=2, include_stop_str_in_output=True))
    _, p = only_request(engine)
    assert (p.presence_penalty, p.frequency_penalty, p.min_tokens) == (0.5, -0.25, 2)
    assert p.include_stop_str_in_output is True


def test_max_n_is_the_servers_choice(engine):
    app = create_app(engine, served_model_name=MODEL, api_key=None, metrics=Metrics(), max_n=2)
    with TestClient(app) as http:
        assert http.post("/v1/completions", json={"prompt": "ab", "n": 2}).status_code == 200
        assert "--max-n 2" in error_of(http.post("/v1/completions", json={"prompt": "ab", "n": 3}), 400)["message"]


def test_version_and_ping(http):
    assert http.get("/version").json() == {"version": __version__}
    assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200


# ------------------------------------------------------------------------------------- lifecycle
def test_draining_refuses_new_requests_and_fails_health(engine):
    lifecycle = Lifecycle()
    app = create_app(engine, served_model_name=MODEL, api_key=None, metrics=Metrics(), lifecycle=lifecycle)
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        lifecycle.draining = "the server is shutting down"
        err = error_of(http.post("/v1/completions", json={"prompt": "ab"}), 503)
        assert "shutting down" in err["message"] and err["type"] == "server_error"
        assert http.get("/health").status_code == 503
        assert http.get("/v1/models").status_code == 200  # only new generation is refused


def test_requests_in_flight_are_counted(engine):
    lifecycle, seen = Lifecycle(), []
    engine.delay = 0.05
    app = create_app(engine, served_model_name=MODEL, api_key=None, metrics=Metrics(), lifecycle=lifecycle)
    with TestClient(app) as http:
        t = threading.Thread(target=lambda: http.post("/v1/completions", json={"prompt": "abcdef"}))
        t.start()
        deadline = time.time() + 2
        while lifecycle.in_flight == 0 and time.time() < deadline:
            time.sleep(0.01)
        seen.append(lifecycle.in_flight)
        t.join()
    assert seen == [1] and lifecycle.idle


def test_a_stream_ended_by_the_server_gets_error_finish_and_done(http, engine):
    engine.delay = 0.02
    out = []

    def read():
        out.extend(events(http, "/v1/chat/completions", dict(messages=HELLO, n=2, stream=True)))

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.15)
    engine.abort_all(ServiceUnavailable("rank 1 exited unexpectedly (exit code -9); the server is stopping"))
    t.join(5)
    *chunks, error, done = out
    assert done == "[DONE]" and error["error"]["code"] == "service_unavailable"
    assert "rank 1 exited unexpectedly" in error["error"]["message"]
    reasons = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
               if c["choices"][0]["finish_reason"]}
    assert reasons == {0: "error", 1: "error"}
    err = error_of(http.post("/v1/completions", json={"prompt": "ab"}, headers=AUTH), 503)
    assert "rank 1" in err["message"]
