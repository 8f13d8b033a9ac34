"""`tprun serve` on loopback with the real SmolLM2, driven by the official openai client."""
import json
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from runtime.engine.sampling import SamplingParams
from tests.e2e.server import Server

pytestmark = pytest.mark.slow
KEY = "test-key"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
             "Say hello in Spanish.", "What do bees make?", "Name a large ocean.", "What color is the sky?",
             "Which planet is red?"]


@pytest.fixture(scope="module")
def server(smollm2_ws):
    s = Server(smollm2_ws[1], "--enable-prefix-caching", "--block-size", "16", "--max-model-len", "2048", api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def _chat(client, q, **kw):
    kw = {"temperature": 0, "max_tokens": 24, **kw}
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": q}], **kw)


def test_models_and_greedy_chat_equal_tprun_generate(client, llms):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    r = _chat(client, QUESTIONS[0], max_tokens=48)
    expected = llms[1].chat([{"role": "user", "content": QUESTIONS[0]}],
                            SamplingParams(temperature=0, max_tokens=48))[0].outputs[0]
    assert r.choices[0].message.content == expected.text and "Paris" in expected.text
    assert r.choices[0].finish_reason == expected.finish_reason == "stop"
    assert r.usage.completion_tokens == len(expected.token_ids) and r.usage.prompt_tokens > 10


def test_completion_streaming_equals_non_streaming_and_reports_usage(client):
    kw = dict(model="smollm2", prompt="The three primary colors are", temperature=0, max_tokens=20)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20 == whole.usage.completion_tokens


def test_stop_seed_n_and_logprobs(client):
    plain = _chat(client, QUESTIONS[3]).choices[0].message.content
    stop = plain.split()[1]
    cut = _chat(client, QUESTIONS[3], stop=[stop]).choices[0]
    assert cut.message.content == plain[:plain.index(stop)] and cut.finish_reason == "stop"
    sampled = [_chat(client, QUESTIONS[1], temperature=0.9, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    three = client.completions.create(model="smollm2", prompt="Once upon a time", temperature=1.0, seed=3, n=3,
                                      max_tokens=12)
    assert sorted(c.index for c in three.choices) == [0, 1, 2] and len({c.text for c in three.choices}) > 1
    lp = _chat(client, QUESTIONS[2], logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert len(lp) > 0 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)


def test_error_codes_and_shapes(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens"):
        _chat(client, "hi", max_tokens=5000)
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type"}
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "smollm2", "prompt": "x", "temperature": -1},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    assert _chat(client, QUESTIONS[0], max_tokens=4).choices[0].message.content  # still serving


def test_64_concurrent_streams_complete_correctly_and_free_every_block(server, client):
    expected = {q: _chat(client, q).choices[0].message.content for q in QUESTIONS}
    got, errors = {}, []

    def stream(i):
        try:
            q = QUESTIONS[i % len(QUESTIONS)]
            chunks = _chat(client, q, stream=True)
            got[i] = (q, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        except Exception as e:  # surfaced below with the request number
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 64
    assert all(text == expected[q] for q, text in got.values())
    server.wait_idle()
    assert server.metric("tprun_prefix_cache_hits_total") > 0  # 64 requests over 8 prompts share blocks


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    body = {"model": "smollm2", "prompt": "Write a long story about the sea.", "max_tokens": 1000,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        first = [json.loads(line[6:]) for line in (next(lines), next(lines)) if line.startswith("data: ")]
        assert first and server.metric("tprun_kv_cache_usage_ratio") > 0
    server.wait_idle(timeout=20)


def test_preemption_under_a_tiny_cache_completes_every_request(smollm2_ws, client):
    # Every request runs its full 40 tokens (~70 with the chat prompt, 5 blocks): 8 of them need 40
    # blocks, the cache has 12, so the youngest are preempted and recomputed.
    kw = {"max_tokens": 40, "extra_body": {"ignore_eos": True}}
    expected = {q: _chat(client, q, **kw).choices[0].message.content for q in QUESTIONS}
    tiny = Server(smollm2_ws[1], "--kv-cache-tokens", "192", "--block-size", "16", "--max-model-len", "512")
    try:
        c = openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="none", max_retries=0, timeout=300)
        got = {}
        threads = [threading.Thread(target=lambda q=q: got.__setitem__(q, _chat(c, q, **kw)))
                   for q in QUESTIONS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {q: r.choices[0].message.content for q, r in got.items()} == expected
        assert tiny.metric("tprun_preemptions_total") > 0
        tiny.wait_idle()
    finally:
        tiny.close()


def test_tp3_server_answers_like_tp1_and_allocates_what_tprun_plan_says(smollm2_ws, client):
    expected = _chat(client, QUESTIONS[0], max_tokens=32).choices[0].message.content
    budget = ["--gpu-mem", "3GiB", "--max-model-len", "4096"]
    plan = subprocess.run([sys.executable, "-m", "runtime", "plan", str(smollm2_ws[3]), "--json", *budget],
                          capture_output=True, text=True, check=True).stdout
    tp3 = Server(smollm2_ws[3], *budget)
    try:
        c = openai.OpenAI(base_url=f"{tp3.url}/v1", api_key="none", max_retries=0, timeout=300)
        assert _chat(c, QUESTIONS[0], max_tokens=32).choices[0].message.content == expected
        assert "".join(ch.choices[0].delta.content or "" for ch in _chat(c, QUESTIONS[0], max_tokens=32, stream=True)
                       if ch.choices) == expected
    finally:
        log = tp3.close()
    for rank in range(3):  # the start-up table: one line per rank, then the concurrency it buys
        assert any(line.split()[:1] == [str(rank)] for line in log.splitlines()), log
    assert "maximum concurrency for 4096-token requests" in log
    assert f"KV cache: fp32, {json.loads(plan)['num_blocks']} blocks of 64 tokens" in log, log
