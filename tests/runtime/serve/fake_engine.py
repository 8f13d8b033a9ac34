"""A deterministic stand-in for the serving engine: no model, the answer is the prompt reversed.

It keeps the contract's promises (the real engine's check of a request, refusals before the first
Delta, usage on the last Delta, closing the iterator aborts) and records what it was asked, so HTTP
tests can check both directions without a model or a GPU.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import AsyncIterator

from runtime.engine.core import check_request
from runtime.engine.sampling import SamplingParams, TokenLogprobs
from runtime.serve.contract import Delta, ServiceUnavailable, Usage

BOS = 1  # also the fake's EOS: a reversed prompt that started with BOS ends with it


class FakeTokenizer:
    """One token per character (id = code point); id 1 is BOS and decodes to nothing."""

    vocab_size = 0x110000  # every code point
    bos_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) for c in text]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != BOS)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tools: list | None = None, **kwargs) -> str:
        # "</>" ends a turn, so continuing the final message has something to drop
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        if tools:
            text = f"<tools>{json.dumps(tools)}</>" + text
        if continue_final_message:
            return text.removesuffix("</>")
        return text + ("<assistant>" if add_generation_prompt else "")


def fake_logprob(position: int) -> float:
    """Logprob the fake reports for the token at ``position`` (exact in binary, for == in tests)."""
    return -(position + 1) / 8


class FakeEngine:
    """Sample i of a request emits the reversed prompt from its i-th token on, one token per Delta.

    A sample stops ("stop") at BOS (unless ignore_eos), at a stop token id, at a stop string (whose
    text is held back, as the real engine does) or when the prompt runs out; "length" at max_tokens.
    """

    def __init__(self, max_model_len: int = 256) -> None:
        self.max_model_len = max_model_len
        self.tokenizer = FakeTokenizer()
        self.delay = 0.0  # seconds between decode steps
        self.fail: Exception | None = None  # raised before the first Delta
        self.fail_after: int | None = None  # raise RuntimeError after this many Deltas
        self.refusal: ServiceUnavailable | None = None  # set by abort_all
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.finished: list[str] = []
        self.aborted: list[str] = []
        # Held like a real engine holds its requests: were the streams dropped instead, garbage
        # collection would close them too and hide an HTTP layer that forgets to.
        self.streams: list[AsyncIterator[Delta]] = []

    def generate(self, request_id: str, prompt_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[Delta]:
        self.streams.append(self._generate(request_id, list(prompt_ids), params))
        return self.streams[-1]

    def abort_all(self, error: ServiceUnavailable) -> None:
        self.refusal = error

    def metrics_text(self) -> bytes:
        raise AssertionError("the HTTP layer must render its Metrics, not the engine's text")

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if self.fail is not None:
            raise self.fail
        if self.refusal is not None:
            raise self.refusal
        check_request(prompt_ids, params, self.max_model_len, self.tokenizer.vocab_size, cache_tokens=sys.maxsize)

    async def _generate(self, request_id: str, prompt_ids: list[int],
                        params: SamplingParams) -> AsyncIterator[Delta]:
        self._check(prompt_ids, params)
        self.requests[request_id] = (prompt_ids, params)
        samples = [self._sample(request_id, prompt_ids, params, i) for i in range(params.n)]
        order = [sample[step] for step in range(max(map(len, samples))) for sample in samples if step < len(sample)]
        usage = Usage(len(prompt_ids), sum(len(d.token_ids) for d in order))
        order[-1] = dataclasses.replace(order[-1], usage=usage)  # on the request's last Delta
        done, sent = False, 0
        try:
            for step in range(max(len(s) for s in samples)):
                await asyncio.sleep(self.delay)
                if self.refusal is not None:
                    raise self.refusal
                for _ in range(sum(step < len(sample) for sample in samples)):
                    if sent == self.fail_after:
                        raise RuntimeError("fake engine failure")
                    sent += 1
                    yield order[sent - 1]
            done = True
        finally:
            (self.finished if done else self.aborted).append(request_id)

    def _sample(self, request_id: str, prompt_ids: list[int], params: SamplingParams, index: int) -> list[Delta]:
        tokens, finish = [], "stop"
        for t in reversed(prompt_ids[:len(prompt_ids) - index]):
            if params.max_tokens is not None and len(tokens) == params.max_tokens:
                finish = "length"
                break
            if (t == BOS and not params.ignore_eos) or t in params.stop_token_ids:
                break
            tokens.append(t)
        text = self.tokenizer.decode(tokens)
        cut = min((p for p in (text.find(s) for s in params.stop) if p >= 0), default=None)
        if cut is not None:  # the tokens that completed the stop string stay, their text does not
            tokens = tokens[:cut + max(len(s) for s in params.stop if text.find(s) == cut)]
            finish = "stop"
        shown = len(text) if cut is None else cut
        deltas = [Delta(request_id, index, self.tokenizer.decode([t]) if k < shown else "", [t],
                        self._logprobs(t, k, params)) for k, t in enumerate(tokens)]
        last = deltas.pop() if deltas else Delta(request_id, index, "", [])
        return [*deltas, dataclasses.replace(last, finish_reason=finish)]

    @staticmethod
    def _logprobs(token: int, position: int, params: SamplingParams) -> list[TokenLogprobs]:
        if params.logprobs is None:
            return []
        lp = fake_logprob(position)
        top = tuple((token + j, lp - j) for j in range(params.logprobs))  # chosen token first
        return [TokenLogprobs(token, lp, top)]
