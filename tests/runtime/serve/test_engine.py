"""The serving engine on a tiny real model: streams, admission bound, queue bound, aborts, and behind
the HTTP app: a failing step is a server error (500 / in-band), the server keeps serving, a user error
stays a 400."""
import asyncio
import json

import pytest
from starlette.testclient import TestClient

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.config import CacheConfig
from runtime.engine.sampling import SamplingParams
from runtime.serve.app import create_app
from runtime.serve.async_engine import AsyncEngine
from runtime.serve.contract import ContextTooLong, Overloaded
from runtime.serve.metrics import Metrics
from runtime.worker.pipeline import PendingLogits

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("serve-engine")
    convert(ConvertOptions(make_tiny(root / "src", "llama", vocab=301, seed=4), root / "ws", 1))
    with LLM(root / "ws", device="cpu", cache=CacheConfig(block_size=16, kv_cache_tokens=2048),
             max_model_len=512) as llm:
        yield llm


async def _collect(stream):
    return [d async for d in stream]


def test_streams_match_offline_generate_and_free_blocks(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2, logprobs=2)
    expected = llm.generate([5, 6, 7], params)[0].outputs
    engine = AsyncEngine(llm, Metrics())
    try:
        deltas = asyncio.run(_collect(engine.generate("r1", [5, 6, 7], params)))
    finally:
        engine.close()
    for sample in (0, 1):
        mine = [d for d in deltas if d.index == sample]
        assert [t for d in mine for t in d.token_ids] == expected[sample].token_ids
        assert "".join(d.text for d in mine) == expected[sample].text
        assert mine[-1].finish_reason == "length" and all(len(d.logprobs) == 1 for d in mine)
    # usage travels on the request's last Delta, and only there
    assert [d.usage is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].usage.completion_tokens == 24 and deltas[-1].usage.prompt_tokens == 3
    assert llm.blocks.num_used == 0


def test_queue_bound_refuses_with_overloaded_and_aborts_free_blocks(llm):
    engine = AsyncEngine(llm, Metrics(), max_concurrent_requests=1, max_queue=1)

    async def scenario():
        first = engine.generate("a", [3, 4, 5], LONG)
        await anext(first)  # admitted and running
        second = engine.generate("b", [3, 4], LONG)
        second_task = asyncio.ensure_future(anext(second))  # waits in the queue behind "a"
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="--max-queue 1"):
            await anext(engine.generate("c", [3], LONG))
        await first.aclose()  # the client of "a" goes away: "b" gets its slot
        await second_task
        await second.aclose()

    try:
        asyncio.run(scenario())
        for _ in range(100):  # the engine thread frees aborted requests before its next step
            if llm.blocks.num_used == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert llm.blocks.num_used == 0 and not engine._active
    finally:
        engine.close()


def test_context_beyond_the_window_is_refused_before_any_work(llm):
    engine = AsyncEngine(llm, Metrics())
    try:
        with pytest.raises(ContextTooLong, match="maximum context length is 512 tokens, but you requested 610"):
            asyncio.run(_collect(engine.generate("x", list(range(10)), SamplingParams(max_tokens=600))))
    finally:
        engine.close()


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(llm, monkeypatch):
    engine = AsyncEngine(llm, Metrics())
    real_execute = (lambda step, submit=llm.driver.submit: submit(step).result())
    calls = {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real_execute(step)

    monkeypatch.setattr(llm.driver, "submit", lambda step: PendingLogits.done(flaky(step)))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        with pytest.raises(Exception, match="generation failed: device lost"):
            asyncio.run(_collect(engine.generate("bad", [3, 4], params)))
        deltas = asyncio.run(_collect(engine.generate("good", [3, 4], params)))
        assert sum(len(d.token_ids) for d in deltas) == 4 and llm.blocks.num_used == 0
    finally:
        engine.close()


# --------------------------------------------------------------------------- behind the HTTP app
@pytest.fixture
def served(llm):
    """(HTTP client, metrics) of the app over a real AsyncEngine on the tiny model."""
    metrics = Metrics()
    engine = AsyncEngine(llm, metrics)
    app = create_app(engine, served_model_name="tiny", api_key=None, metrics=metrics)
    try:
        with TestClient(app, raise_server_exceptions=False) as http:
            yield http, metrics
    finally:
        engine.close()


def _fail_once(monkeypatch, llm, at_call: int) -> None:
    """The driver's execute raises on its ``at_call``-th call (1-based) from now on, once."""
    real_execute, calls = (lambda step, submit=llm.driver.submit: submit(step).result()), {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise RuntimeError("device lost")
        return real_execute(step)

    monkeypatch.setattr(llm.driver, "submit", lambda step: PendingLogits.done(flaky(step)))


def _metric(metrics: Metrics, line: str) -> bool:
    return line in metrics.render().decode()


BODY = {"prompt": [3, 4, 5], "max_tokens": 4, "ignore_eos": True, "temperature": 0}


def test_a_failing_step_is_a_500_server_error_and_the_next_request_succeeds(served, llm, monkeypatch):
    http, metrics = served
    _fail_once(monkeypatch, llm, at_call=1)
    r = http.post("/v1/completions", json=BODY)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and "generation failed: device lost" in err["message"]
    ok = http.post("/v1/completions", json=BODY)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert ok.json()["choices"][0]["finish_reason"] == "length"
    assert _metric(metrics, "tprun_engine_step_failures_total 1.0")
    assert _metric(metrics, 'tprun_requests_total{route="/v1/completions",status="500"} 1.0')
    assert _metric(metrics, 'tprun_requests_total{route="/v1/completions",status="200"} 1.0')
    assert llm.blocks.num_used == 0


def test_a_step_failing_mid_stream_ends_it_in_band_with_a_server_error(served, llm, monkeypatch):
    http, metrics = served
    _fail_once(monkeypatch, llm, at_call=2)  # after the first token went out
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "generation failed: device lost" in error["message"]
    reasons = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert reasons == ["error"]
    ok = http.post("/v1/completions", json={**BODY, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[len("data: "):]) for line in ok.text.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 4  # usage from the engine's last Delta
    assert _metric(metrics, "tprun_engine_step_failures_total 1.0") and llm.blocks.num_used == 0


@pytest.mark.parametrize("body, param, code, words", [
    ({"prompt": [3, 301]}, "prompt", None, "out of range"),
    ({"prompt": ""}, "prompt", None, "empty"),
    ({"prompt": [3] * 500, "max_tokens": 20}, "prompt", "context_length_exceeded",
     "maximum context length is 512 tokens, but you requested 520"),
    ({"prompt": [3] * 512}, "prompt", "context_length_exceeded", "context window (max_model_len) is 512"),
], ids=["vocab", "empty", "prompt-plus-max-tokens", "prompt-fills-window"])
def test_user_errors_stay_400_from_the_engine_check(served, body, param, code, words):
    http, metrics = served
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert words in err["message"]
    assert _metric(metrics, "tprun_engine_step_failures_total 0.0")


def test_load_owns_the_model_on_the_engine_thread(llm, tmp_path):
    """``AsyncEngine.load`` opens the model on the engine's thread, steps it there, closes it there (once) at
    ``close``; a loader's error reaches the caller as it was raised."""
    import threading

    from formats.errors import TpDeployError

    seen: dict[str, str] = {}

    class Owned:  # the module's model, recording which thread opened and closed it
        def __init__(self):
            seen["opened"] = threading.current_thread().name
            self.engine, self.tokenizer, self.max_model_len = llm.engine, llm.tokenizer, llm.max_model_len

        def close(self):
            seen["closed"] = seen.get("closed", "") + threading.current_thread().name

    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    # Before the engine thread exists: it steps the same Engine, so a generate beside it would race it for steps.
    want = llm.generate([5, 6, 7], params)[0].outputs[0].token_ids
    engine = AsyncEngine.load(Owned, Metrics())
    try:
        deltas = asyncio.run(_collect(engine.generate("r1", [5, 6, 7], params)))
        assert [t for d in deltas for t in d.token_ids] == want
    finally:
        engine.close()
    assert seen == {"opened": "tprun-engine", "closed": "tprun-engine"}

    def refuse():
        raise TpDeployError("no such workspace")
    with pytest.raises(TpDeployError, match="no such workspace"):
        AsyncEngine.load(refuse, Metrics())

    class Broken(Owned):  # opens, but the engine cannot be set up on it: the model is closed, not leaked
        def __init__(self):
            super().__init__()
            del self.tokenizer

    seen.clear()
    with pytest.raises(AttributeError, match="tokenizer"):
        AsyncEngine.load(Broken, Metrics())
    assert seen == {"opened": "tprun-engine", "closed": "tprun-engine"}
