"""The offline ``LLM`` on top of the engine's step outputs: streamed text, the context window, errors."""
import pytest

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.errors import ContextTooLong, InvalidPrompt
from runtime.engine.outputs import Delta
from runtime.engine.sampling import SamplingParams

WINDOW = 64


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("api")
    convert(ConvertOptions(make_tiny(root / "src", "llama", vocab=301, seed=6), root / "ws", 1))
    with LLM(root / "ws", device="cpu", max_model_len=WINDOW) as model:
        yield model


def test_on_delta_streams_each_sample_as_its_final_output(llm):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True, n=2, logprobs=1)
    seen: list[tuple[Delta, str]] = []
    out = llm.generate([[5, 6, 7], [8, 9]], params, on_delta=lambda delta, text: seen.append((delta, text)))
    assert all(isinstance(d, Delta) and d.text == text for d, text in seen)
    for r, request in enumerate(out):
        for c in request.outputs:
            mine = [d for d, _ in seen if d.request_id == str(r) and d.index == c.index]
            assert "".join(d.text for d in mine) == c.text and mine[-1].finish_reason == c.finish_reason == "length"
            assert len(c.token_ids) == len(c.logprobs) == 12
            assert c.text == llm.tokenizer.decode(c.token_ids)
    assert llm.blocks.num_used == 0


def test_offline_generation_stops_at_the_context_window(llm):
    # as in vLLM's offline API: a max_tokens past the window is not an error, the window ends the sample
    out = llm.generate([5] * 60, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == WINDOW - 60
    with pytest.raises(ContextTooLong, match=f"the prompt has {WINDOW} tokens but the context window"):
        llm.generate([5] * WINDOW, SamplingParams(max_tokens=4))


def test_a_bad_prompt_among_several_leaves_nothing_behind(llm):
    with pytest.raises(InvalidPrompt, match=r"prompt token ids \[999\] are out of range"):
        llm.generate([[5, 6], [7, 999]], SamplingParams(max_tokens=4))
    assert not llm.engine.has_work and llm.blocks.num_used == 0
    assert llm.generate([5, 6], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].finish_reason
