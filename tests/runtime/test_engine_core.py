"""The engine's request boundary without a model: add (the one check), step outputs, abort, stats,
failed steps, and incremental detokenization checked against decoding every id every step.

``ReplayDriver`` returns logits whose argmax is the next id of a script, so the engine "generates"
exactly the ids a test chose (or that the real SmolLM2 generated) through its whole step path.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from formats.errors import TpDeployError
from runtime.engine.core import Engine
from runtime.engine.errors import ContextTooLong, InvalidPrompt
from runtime.engine.sampling import SamplingParams
from runtime.engine.stops import StopChecker, safe_prefix
from runtime.engine.tokenizer import Tokenizer
from runtime.kv.blocks import BlockManager
from runtime.worker.pipeline import PendingLogits

BLOCK = 16
WINDOW = 64  # max_model_len of the small engines


class ReplayDriver:
    """Every sequence samples ``script[i]`` as its i-th generated token (greedy), whatever the batch."""

    def __init__(self, vocab: int, script: list[int], prompt_len: int):
        self.vocab, self.script, self.prompt_len = vocab, script, prompt_len
        self.fail_next = False

    def submit(self, step):
        return PendingLogits.done(self.execute(step))

    def execute(self, step):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        logits = torch.zeros(len(step.batch.seqs), self.vocab)
        for row, s in enumerate(step.batch.seqs):  # s.context: tokens held after this step
            logits[row, self.script[(s.context - self.prompt_len) % len(self.script)]] = 1.0
        return logits


class SpaceTok:
    """Ids as words ("7 8 9"); counts the ids it decodes, to see the work per generated token."""

    eos_token_ids = frozenset({0})

    def __init__(self):
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 0))


def engine(tok, script, prompt_len=3, vocab=100, blocks=64, window=WINDOW) -> tuple[Engine, ReplayDriver]:
    driver = ReplayDriver(vocab, script, prompt_len)
    return Engine(driver, tok, BlockManager(blocks, BLOCK), vocab, window), driver


def run(eng: Engine) -> list:
    deltas = []
    while eng.has_work:
        deltas += eng.step()
    return deltas


def joined(deltas, request_id: str, index: int = 0) -> tuple[str, list[int], str | None]:
    mine = [d for d in deltas if d.request_id == request_id and d.index == index]
    return "".join(d.text for d in mine), [t for d in mine for t in d.token_ids], mine[-1].finish_reason


# ------------------------------------------------------------------------------------------ add
@pytest.mark.parametrize("prompt, params, error, words", [
    ([], SamplingParams(), InvalidPrompt, "the prompt is empty"),
    ([5, 100, 7], SamplingParams(), InvalidPrompt, "prompt token ids [100] are out of range"),
    ([-1, 5], SamplingParams(), InvalidPrompt, "vocabulary has ids 0..99"),
    (list(range(WINDOW)), SamplingParams(max_tokens=None), ContextTooLong,
     f"the prompt has {WINDOW} tokens but the context window (max_model_len) is {WINDOW}"),
    ([5] * 10, SamplingParams(max_tokens=60), ContextTooLong,
     f"maximum context length is {WINDOW} tokens, but you requested 70 tokens (10 in the prompt, 60 for"),
    ([5] * 10, SamplingParams(max_tokens=40), TpDeployError, "needs 50 tokens of KV cache, but the cache holds 32"),
], ids=["empty", "past-vocab", "negative", "prompt-fills-window", "prompt-plus-max-tokens", "cache"])
def test_add_refuses_before_touching_any_state(prompt, params, error, words):
    eng, _ = engine(SpaceTok(), [1], blocks=2)  # 2 blocks of 16: the cache holds 32 tokens
    with pytest.raises(error) as e:
        eng.add("r", prompt, params)
    assert words in str(e.value)
    with pytest.raises(error):
        eng.check(prompt, params)  # the same check, stateless (the server's early refusal)
    assert not eng.has_work and eng.stats().kv_blocks_used == 0
    eng.add("r", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0))  # the id is still free
    assert [d.token_ids for d in run(eng)] == [[1], [1]]


def test_a_request_id_is_taken_until_its_request_ends():
    eng, _ = engine(SpaceTok(), [1])
    eng.add("r", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(TpDeployError, match="request id 'r' is already in the engine"):
        eng.add("r", [5], SamplingParams())
    run(eng)
    eng.add("r", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0))


# ----------------------------------------------------------------------------------------- step
def test_step_outputs_per_sample_with_usage_on_the_last_one():
    tok = SpaceTok()
    eng, _ = engine(tok, [11, 12, 13, 14, 15])
    eng.add("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, n=2, logprobs=1))
    eng.add("b", [8, 9, 10], SamplingParams(max_tokens=5, temperature=0))
    steps = []
    while eng.has_work:
        steps.append(eng.step())
    assert [sorted((d.request_id, d.index) for d in s) for s in steps] == \
        [[("a", 0), ("a", 1), ("b", 0)]] * 3 + [[("b", 0)]] * 2  # every sample advances once a step
    deltas = [d for s in steps for d in s]
    for request_id, index, ids in (("a", 0, [11, 12, 13]), ("a", 1, [11, 12, 13]), ("b", 0, [11, 12, 13, 14, 15])):
        text, tokens, finish = joined(deltas, request_id, index)
        assert tokens == ids and text == tok.decode(ids) and finish == "length"
    assert all(len(d.logprobs) == (d.request_id == "a") for d in deltas)
    with_usage = [d for d in deltas if d.usage is not None]
    assert [(d.request_id, d.usage.prompt_tokens, d.usage.completion_tokens) for d in with_usage] == \
        [("a", 3, 6), ("b", 3, 5)]
    assert all(d is [x for x in deltas if x.request_id == d.request_id][-1] for d in with_usage)  # last ones
    stats = eng.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used, stats.kv_blocks_total) == (0, 0, 0, 64)


def test_abort_frees_blocks_now_and_ends_the_request_silently():
    eng, _ = engine(SpaceTok(), [11, 12, 13])
    eng.add("a", [5] * 40, SamplingParams(max_tokens=20, temperature=0))
    eng.add("b", [6] * 3, SamplingParams(max_tokens=20, temperature=0))
    eng.step()
    busy = eng.stats()
    assert (busy.running, busy.kv_blocks_used) == (2, 4)  # 40 prompt tokens in 3 blocks, 3 in 1
    eng.abort("a")
    eng.abort("a"), eng.abort("never-added")  # idempotent
    assert eng.stats().kv_blocks_used == 1 and eng.stats().running == 1
    assert {d.request_id for d in run(eng)} == {"b"}


def test_a_failed_step_ends_every_request_and_the_engine_goes_on():
    eng, driver = engine(SpaceTok(), [11, 12, 13])
    eng.add("a", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0))
    eng.add("b", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0))
    eng.step()
    driver.fail_next = True
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    assert not eng.has_work and eng.stats().kv_blocks_used == 0
    eng.add("a", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0))  # the ids are free again
    assert [d.token_ids for d in run(eng)] == [[11], [12]]


def test_stats_count_prefix_cache_and_preemptions():
    tok = SpaceTok()
    driver = ReplayDriver(100, [11], prompt_len=40)
    eng = Engine(driver, tok, BlockManager(6, BLOCK, prefix_caching=True), 100, WINDOW)
    eng.add("a", [5] * 40, SamplingParams(max_tokens=20, temperature=0))
    eng.add("b", [5] * 40, SamplingParams(max_tokens=20, temperature=0))  # 2 x 4 blocks do not fit in 6
    deltas = run(eng)
    assert joined(deltas, "a")[1] == joined(deltas, "b")[1] == [11] * 20
    stats = eng.stats()
    # "b" is preempted, and re-admitted after "a" registered its full prompt blocks in the prefix cache
    assert stats.preemptions >= 1 and stats.prefix_queried >= 80 and stats.prefix_hit >= 32


# ------------------------------------------------------------------------- incremental detokenizing
def test_detokenizing_work_per_token_does_not_grow_with_the_output():
    per_token = {}
    for length in (32, 256):
        tok = SpaceTok()
        eng, _ = engine(tok, [11, 12, 13], vocab=100, blocks=64, window=1024)
        eng.add("r", [5, 6, 7], SamplingParams(max_tokens=length, temperature=0, stop=("no such stop",)))
        text, tokens, _ = joined(run(eng), "r")
        assert len(tokens) == length and text == SpaceTok().decode(tokens)
        per_token[length] = tok.decoded / length
    # re-decoding the whole output each step costs ~length/2 ids per token; a window costs a few
    assert per_token[256] <= per_token[32] * 1.1 and per_token[256] < 5


def reference(tok, ids: list[int], params: SamplingParams) -> tuple[str, str]:
    """The text and finish reason the engine gave before incremental detokenization: every step decode
    all generated ids and feed the full text to the stop checker (the earlier ``Engine._advance``)."""
    stops, out, text_out = StopChecker(params.stop, params.include_stop_str_in_output), [], []
    for token in ids:
        out.append(token)
        finish = "stop" if token in params.stop_token_ids or (
            token in tok.eos_token_ids and not params.ignore_eos) else "length" if len(out) == len(ids) else None
        by_token = finish == "stop" and not params.include_stop_str_in_output
        text = tok.decode(out[:-1] if by_token else out, skip_special_tokens=params.skip_special_tokens)
        delta, stopped = stops.feed(text if finish else safe_prefix(text), check=len(out) > params.min_tokens)
        if stopped:
            return "".join(text_out) + delta, "stop"
        text_out.append(delta + (stops.flush() if finish else ""))
        if finish:
            return "".join(text_out), finish
    raise AssertionError("the script ran out before the sequence finished")


def replay(tok, vocab: int, prompt: list[int], ids: list[int], params: SamplingParams) -> tuple[str, str]:
    """Text and finish reason of the engine generating exactly ``ids`` after ``prompt``."""
    driver = ReplayDriver(vocab, ids, len(prompt))
    eng = Engine(driver, tok, BlockManager(-(-(len(prompt) + len(ids)) // BLOCK), BLOCK), vocab, len(prompt) + len(ids))
    eng.add("r", prompt, params)
    deltas = run(eng)
    assert not any("\ufffd" in d.text for d in deltas[:-1]), "a partial character was streamed"
    text, _, finish = joined(deltas, "r")
    return text, finish


def cases(tok, ids: list[int], rng: random.Random) -> list[SamplingParams]:
    """Parameters to replay ``ids`` with: plain, specials kept, stop strings across tokens (cut and
    included), a stop string within min_tokens, a stop token."""
    text = tok.decode(ids)
    base = {"max_tokens": len(ids), "temperature": 0}
    params = [SamplingParams(**base), SamplingParams(**base, skip_special_tokens=False),
              SamplingParams(**base, ignore_eos=True)]
    if len(text) > 8:
        a = rng.randrange(1, len(text) - 4)
        stop = text[a:a + rng.randrange(2, 5)]
        params += [SamplingParams(**base, stop=[stop]), SamplingParams(**base, stop=[stop, text[a + 1]]),
                   SamplingParams(**base, stop=[stop], include_stop_str_in_output=True),
                   SamplingParams(**base, stop=[stop], min_tokens=min(len(ids), 3))]
    if len(ids) > 4:
        params += [SamplingParams(**base, stop_token_ids=[ids[len(ids) // 2]]),
                   SamplingParams(**base, stop_token_ids=[ids[len(ids) // 2]], include_stop_str_in_output=True)]
    return params


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Tokenizer:
    """The tiny byte-level BPE with all 256 bytes: non-ASCII text is split into byte tokens."""
    from tests.fixtures.tiny import tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-tok")
    tiny_tokenizer(300).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return Tokenizer(path)


TEXTS = ["Hello, world! The capital of France is Paris.", "naïve café — 日本語 😀👍🏽 done",
         "<|im_start|>user\nhi<|im_end|>\nok", "one 😀<|im_end|>"]


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "multibyte", "specials", "ends-with-eos"])
def test_engine_text_matches_decoding_every_step_tiny_tokenizer(tiny_tok, text):
    ids = tiny_tok.encode(text, add_special_tokens=False)
    rng = random.Random(text)
    for params in cases(tiny_tok, ids, rng):
        assert replay(tiny_tok, tiny_tok.vocab_size, [1, 5, 6], ids, params) == reference(tiny_tok, ids, params), params


def test_engine_streams_a_character_split_over_tokens_once_complete(tiny_tok):
    ids = tiny_tok.encode("a😀b", add_special_tokens=False)
    assert len(ids) == 6  # "a", four byte tokens of the emoji, "b"
    driver = ReplayDriver(tiny_tok.vocab_size, ids, 1)
    eng = Engine(driver, tiny_tok, BlockManager(4, BLOCK), tiny_tok.vocab_size, WINDOW)
    eng.add("r", [5], SamplingParams(max_tokens=len(ids), temperature=0))
    assert [d.text for d in run(eng)] == ["a", "", "", "", "😀", "b"]


@pytest.mark.slow
def test_engine_text_matches_decoding_every_step_smollm2(smollm2, smol_generated, tmp_path):
    from converter.tokenizer import write_tokenizer

    write_tokenizer(smollm2, tmp_path / "tokenizer", json.loads((smollm2 / "config.json").read_text()))
    tok = Tokenizer(tmp_path / "tokenizer")
    rng = random.Random(0)
    for prompt, ids in smol_generated:
        for params in cases(tok, ids, rng):
            assert replay(tok, tok.vocab_size, prompt, ids, params) == reference(tok, ids, params), (ids, params)
