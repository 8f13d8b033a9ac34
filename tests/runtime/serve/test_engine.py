"""The serving engine on a tiny real model: streams, admission bound, queue bound, aborts."""
import asyncio

import pytest

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams
from runtime.serve.async_engine import AsyncEngine
from runtime.serve.contract import ContextTooLong, Overloaded
from runtime.serve.metrics import Metrics
from runtime.worker.memory import CacheConfig

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
    assert engine.usage("r1").completion_tokens == 24 and llm.blocks.num_used == 0


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
    real_execute = llm.driver.execute
    calls = {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real_execute(step)

    monkeypatch.setattr(llm.driver, "execute", flaky)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        with pytest.raises(Exception, match="generation failed: device lost"):
            asyncio.run(_collect(engine.generate("bad", [3, 4], params)))
        deltas = asyncio.run(_collect(engine.generate("good", [3, 4], params)))
        assert sum(len(d.token_ids) for d in deltas) == 4 and llm.blocks.num_used == 0
    finally:
        engine.close()
