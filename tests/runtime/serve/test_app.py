"""The OpenAI HTTP layer against a fake engine, driven by the official ``openai`` client."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from formats.errors import TpDeployError
from runtime.serve.app import create_app
from runtime.serve.contract import ContextTooLong, Overloaded
from tests.runtime.serve.conftest import KEY, MODEL
from tests.runtime.serve.fake_engine import BOS, FakeEngine, fake_logprob

HELLO = [{"role": "user", "content": "hello"}]
PROMPT_TEXT = "<user>hello</><assistant>"  # what the fake template makes of HELLO
ABORT_WAIT_S = 2.0  # an abort normally lands within milliseconds; this only bounds a failure


def only_request(engine: FakeEngine):
    (prompt_ids, params), = engine.requests.values()
    return prompt_ids, params


def events(http: TestClient, path: str, body: dict) -> list:
    """Raw SSE events of a streamed request, [DONE] included as the string."""
    with http.stream("POST", path, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = [line[len("data: "):] for line in r.iter_lines() if line]
    return [e if e == "[DONE]" else json.loads(e) for e in raw]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ------------------------------------------------------------------------------------------ routes
def test_models_health_and_open_routes(client, http):
    (card,) = client.models.list().data
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "tpdeploy")
    assert card.max_model_len == 256
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert http.get("/health").json() == {"status": "ok"}  # no key needed
    assert error_of(http.get("/nope"), 404)["type"] == "not_found_error"


def test_chat_completion(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, user="ignored-field")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == PROMPT_TEXT[::-1]
    assert choice.finish_reason == "stop" and choice.logprobs is None
    n = len(PROMPT_TEXT)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, n, 2 * n)
    prompt_ids, params = only_request(engine)
    assert prompt_ids == [ord(c) for c in PROMPT_TEXT]  # chat: no BOS added on top of the template
    assert params.max_tokens is None  # chat default: up to the context window


def test_chat_text_parts_and_max_completion_tokens(client, engine):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                       max_tokens=50, max_completion_tokens=3)
    assert r.choices[0].message.content == ">tn" and r.choices[0].finish_reason == "length"
    prompt_ids, params = only_request(engine)
    assert engine.tokenizer.decode(prompt_ids) == "<user>a\nb</><assistant>" and params.max_tokens == 3


def test_completion_text_and_token_ids(client, engine):
    r = client.completions.create(model=MODEL, prompt="hello")
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("olleh", "stop")  # reached BOS
    assert only_request(engine)[0] == [BOS, *map(ord, "hello")]
    assert only_request(engine)[1].max_tokens == 16  # the legacy API's default
    r = client.completions.create(model=MODEL, prompt=[[104, 105]], max_tokens=1)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("i", "length")


def test_sampling_fields_reach_engine(client, engine):
    client.completions.create(model=MODEL, prompt="hi", temperature=0.5, top_p=0.9, seed=7,
                              stop=["x", "y"], presence_penalty=0, frequency_penalty=0.0,
                              extra_body=dict(top_k=5, min_p=0.1, repetition_penalty=1.2,
                                              ignore_eos=True, stop_token_ids=[3]))
    _, p = only_request(engine)
    assert (p.temperature, p.top_p, p.seed, p.stop) == (0.5, 0.9, 7, ("x", "y"))
    assert (p.top_k, p.min_p) == (5, 0.1)
    assert (p.repetition_penalty, p.ignore_eos, p.stop_token_ids, p.logprobs) == (1.2, True, (3,), None)


def test_stop_string_and_n(client):
    r = client.completions.create(model=MODEL, prompt="abcdef", stop="c")
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("fed", "stop")
    r = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=4)
    want = [PROMPT_TEXT[::-1][i:i + 4] for i in range(3)]
    assert [c.message.content for c in r.choices] == want and [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 12


def test_logprobs_shapes(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, logprobs=True,
                                       top_logprobs=2)
    first = r.choices[0].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == (">", fake_logprob(0), [ord(">")])
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [(">", -0.125), ("?", -1.125)]
    r = client.completions.create(model=MODEL, prompt="abc", logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["c", "b", "a"] and lp.text_offset == [0, 1, 2]
    assert lp.token_logprobs == [fake_logprob(k) for k in range(3)]
    assert lp.top_logprobs[1] == {"b": fake_logprob(1), "c": fake_logprob(1) - 1}
    r = client.completions.create(model=MODEL, prompt="abc", logprobs=0)
    assert r.choices[0].logprobs.top_logprobs[0] == {"c": fake_logprob(0)}  # the chosen token only


# --------------------------------------------------------------------------------------- streaming
def test_chat_stream_chunks(client, http):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=3,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert "".join(c.delta.content or "" for c in mine) == PROMPT_TEXT[::-1][i:i + 3]
        assert mine[-1].finish_reason == "length" and mine[-1].delta.content is None
        assert all(c.finish_reason is None for c in mine[:-1])
    raw = events(http, "/v1/chat/completions", dict(model=MODEL, messages=HELLO, stream=True))
    assert raw[-1] == "[DONE]" and "usage" not in raw[0] and raw[-2]["choices"][0]["delta"] == {}


def test_stream_include_usage(http):
    body = dict(model=MODEL, prompt="abc", stream=True, stream_options={"include_usage": True},
                logprobs=1)
    *chunks, last, done = events(http, "/v1/completions", body)
    assert done == "[DONE]" and last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 4 and last["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "cba"
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [1], [2]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_logprobs(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                                 logprobs=True, stream=True))
    tokens = [t.token for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [">", "t"]


@pytest.mark.parametrize("delay", [0.0, 0.01], ids=["server-blocked-in-send", "server-awaits-engine"])
def test_stopped_reader_aborts_engine_request(client, engine, delay):
    engine.delay = delay
    with client.chat.completions.create(model=MODEL, messages=HELLO, stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 2:
                break
    deadline = time.monotonic() + ABORT_WAIT_S
    while not engine.aborted and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.aborted == list(engine.requests) and not engine.finished


@pytest.mark.parametrize("delay", [0.01, 1.0], ids=["while-generating", "before-first-token"])
def test_disconnect_aborts_non_streaming_request(engine, metrics, delay):
    """Raw ASGI: the client hangs up while a non-streaming answer is still pending."""
    engine.delay = delay
    app = create_app(engine, served_model_name=MODEL, api_key=None, metrics=metrics)
    body = json.dumps({"prompt": "a long prompt", "max_tokens": 10}).encode()
    sent = []

    async def run() -> None:
        messages = [{"type": "http.request", "body": body}, {"type": "http.disconnect"}]

        async def receive():
            if len(messages) == 1:
                await asyncio.sleep(0.03)  # a few tokens in
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"",
                 "query_string": b"", "headers": [(b"content-type", b"application/json")]}
        await app(scope, receive, send)

    asyncio.run(run())
    assert engine.aborted == list(engine.requests) and sent[0]["status"] == 499


def test_error_mid_stream_is_reported_in_band(http, engine):
    engine.fail_after = 2
    *_, error, done = events(http, "/v1/completions", dict(model=MODEL, prompt="abcdef", stream=True))
    assert done == "[DONE]" and error["error"]["type"] == "server_error"


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "hi", "temperature": "hot"}, "temperature", "valid number"),
    ({"prompt": "hi", "top_p": 2}, "top_p", "top_p must be in (0, 1]"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty", "presence_penalty"),
    ({"prompt": "hi", "stop": list("abcde")}, "stop", "at most 4"),
    ({"prompt": ["a", 5]}, "prompt", "item 1 must be a string"),
    ({"prompt": [1, 0x110000]}, "prompt", "out of range"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"prompt": "hi", "echo": True, "logprobs": 1}, None, "echo with logprobs"),
    ({"prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    ({"prompt": "hi", "n": 17}, "n", "--max-n 16"),
    ({}, "prompt", "required"),
], ids=["type", "sampling", "zero-tokens", "penalty", "stops", "batch", "vocab", "logprobs",
        "echo-logprobs", "strict-bool", "max-n", "missing"])
def test_bad_completion_fields(http, body, param, words):
    r = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    err = error_of(r, 400)
    assert words in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"


def test_bad_chat_fields(client):
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": image}])
    assert e.value.body["param"] == "messages[0].content" and "text only" in e.value.message
    with pytest.raises(openai.BadRequestError, match="needs logprobs: true"):
        client.chat.completions.create(model=MODEL, messages=HELLO, top_logprobs=2)


def test_invalid_json(http):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, words in ((b"{bad", "not valid JSON"), (b"[1]", "must be a JSON object")):
        r = http.post("/v1/completions", content=body, headers=auth)
        assert words in error_of(r, 400)["message"]


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.code == "model_not_found" and MODEL in e.value.message


def test_api_key(http, client):
    assert error_of(http.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-wrong", http_client=http,
                          max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        wrong.completions.create(model=MODEL, prompt="hi")
    assert http.get("/metrics").status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_engine_refusals_keep_status_codes(client, engine, stream):
    engine.fail = Overloaded("42 requests are waiting; retry later", retry_after=7)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt="hi", stream=stream)
    assert e.value.response.headers["retry-after"] == "7" and "42 requests" in e.value.message
    engine.fail = ContextTooLong("prompt (300 tokens) exceeds the context window (256 tokens)")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, stream=stream)
    assert e.value.code == "context_length_exceeded" and "300 tokens" in e.value.message
    engine.fail = TpDeployError("stop_token_ids must be >= 0")
    with pytest.raises(openai.BadRequestError, match="stop_token_ids"):
        client.completions.create(model=MODEL, prompt="hi", stream=stream)
    engine.fail = RuntimeError("boom")
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="hi", stream=stream)
    assert e.value.body["type"] == "server_error"


def test_real_context_check(client):
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model=MODEL, prompt="x" * 300)


# ----------------------------------------------------------------------------------------- metrics
def test_metrics_endpoint(client, http, metrics):
    client.completions.create(model=MODEL, prompt="hi")
    http.get("/v1/models")  # 401: no key
    metrics.on_step(running=3, waiting=2, kv_usage=0.5)
    metrics.on_first_token(0.02)
    metrics.on_token_gap(0.01)
    metrics.on_request_done(prompt_tokens=5, completion_tokens=7, seconds=1.5)
    metrics.on_prefix_cache(queried_tokens=10, hit_tokens=4)
    metrics.on_preemption()
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for line in ('tprun_requests_total{route="/v1/completions",status="200"} 1.0',
                 'tprun_requests_total{route="/v1/models",status="401"} 1.0',
                 "tprun_requests_running 3.0", "tprun_requests_waiting 2.0",
                 "tprun_kv_cache_usage_ratio 0.5", "tprun_prompt_tokens_total 5.0",
                 "tprun_generation_tokens_total 7.0", "tprun_prefix_cache_queries_total 10.0",
                 "tprun_prefix_cache_hits_total 4.0", "tprun_preemptions_total 1.0",
                 "tprun_time_to_first_token_seconds_count 1.0",
                 "tprun_inter_token_latency_seconds_count 1.0",
                 "tprun_e2e_request_latency_seconds_sum 1.5"):
        assert line in text, line
