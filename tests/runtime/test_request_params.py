"""min_tokens, include_stop_str_in_output and the presence / frequency penalties end to end: a tiny
random Llama through the offline ``LLM`` on CPU, checked against its own greedy output and logits."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams

PROMPT = [5, 17, 42, 99, 7, 130, 64, 12]
STEPS = 16


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("request-params")
    # vocab 250 < 259: the byte alphabet is printable ASCII only, so every decode is plain text (no U+FFFD)
    src = make_tiny(root / "src", "llama", heads=4, kv_heads=2, vocab=250, seed=5)
    convert(ConvertOptions(src, root / "ws", 1))
    with LLM(root / "ws", device="cpu") as model:
        yield model


def greedy(llm, **kw):
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, **kw)
    return llm.generate(PROMPT, params)[0].outputs[0]


def next_logits(llm, generated: list[int]) -> torch.Tensor:
    return llm.prompt_logits(PROMPT + generated)[-1]  # (V,) logits for the token after ``generated``


def first_new_token(ids: list[int]) -> int:
    """Index of the first token (after the first) that did not occur before it."""
    return next(j for j in range(1, len(ids)) if ids[j] not in ids[:j])


def test_min_tokens_generates_past_a_stop_token_id(llm):
    base = greedy(llm).token_ids
    j = first_new_token(base)
    stop = base[j]
    early = greedy(llm, stop_token_ids=[stop])
    assert early.token_ids == base[:j + 1] and early.finish_reason == "stop"
    k = j + 3
    late = greedy(llm, stop_token_ids=[stop], min_tokens=k)
    assert late.token_ids[:j] == base[:j]
    assert stop not in late.token_ids[:k] and len(late.token_ids) >= k
    # at step j the stop id is masked: greedy takes the runner-up of the same logits
    assert late.token_ids[j] == next_logits(llm, base[:j]).topk(2).indices[1].item()


def test_min_tokens_ignores_stop_strings_that_end_before_it(llm):
    base = greedy(llm)
    k = 4
    boundary = len(llm.tokenizer.decode(base.token_ids[:k]))
    stop = next(c for c in base.text[:boundary] if base.text.find(c, boundary) >= 0)  # seen before and after
    assert greedy(llm, stop=[stop]).text == base.text[:base.text.index(stop)]
    late = greedy(llm, stop=[stop], min_tokens=k)
    assert late.text == base.text[:base.text.index(stop, boundary)] and late.finish_reason == "stop"


@pytest.mark.parametrize("include", [False, True], ids=["stop-cut", "stop-included"])
def test_include_stop_str_in_output(llm, include):
    base = greedy(llm)
    stop = base.text[3:6]
    at = base.text.index(stop)
    deltas = []
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    out = llm.generate(PROMPT, params, on_delta=lambda s, d: deltas.append(d))[0].outputs[0]
    expected = base.text[:at + len(stop)] if include else base.text[:at]
    assert out.text == expected == "".join(deltas) and out.finish_reason == "stop"


@pytest.mark.parametrize("include", [False, True], ids=["token-text-cut", "token-text-included"])
def test_stop_token_text_follows_include_stop_str_in_output(llm, include):
    # vLLM leaves the stop token's own text out unless include_stop_str_in_output asks for it
    base = greedy(llm).token_ids
    j = first_new_token(base)
    out = greedy(llm, stop_token_ids=[base[j]], include_stop_str_in_output=include)
    assert out.token_ids == base[:j + 1]
    assert out.text == llm.tokenizer.decode(base[:j + 1] if include else base[:j])


def reference_penalised_greedy(llm, frequency: float, presence: float) -> list[int]:
    """Greedy decoding by hand: the model's logits, minus the OpenAI penalties over generated ids."""
    out: list[int] = []
    for _ in range(STEPS):
        logits = next_logits(llm, out).double()
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.numel()).double()
            logits -= frequency * counts + presence * (counts > 0)
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 2.0), (-2.0, 0.5)],
                         ids=["frequency", "presence", "negative-frequency"])
def test_penalties_match_a_hand_computed_greedy_reference(llm, frequency, presence):
    base = greedy(llm).token_ids
    assert len(set(base)) < len(base), "the unpenalised output must repeat a token for the penalty to bite"
    got = greedy(llm, frequency_penalty=frequency, presence_penalty=presence).token_ids
    assert got != base
    assert got == reference_penalised_greedy(llm, frequency, presence)


def test_penalised_and_plain_rows_share_a_batch(llm):
    plain = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    penalised = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, presence_penalty=2.0, min_tokens=3)
    alone = [greedy(llm).token_ids, greedy(llm, presence_penalty=2.0, min_tokens=3).token_ids]
    both = llm.generate([PROMPT, PROMPT], [plain, penalised])
    assert [r.outputs[0].token_ids for r in both] == alone
