"""Rank 0's generation loop: schedule, run a step on every rank, sample, detokenize, stop.

``Scheduler`` decides each step (continuous batching, chunked prefill, preemption, prefix cache);
this module turns its work into a ``Step`` for the ranks and the logits back into tokens and text.
Text is re-decoded from all generated ids each step (exactly ``decode(ids)``), then passed through
the stop-string checker, which holds back any tail that could still become a stop string.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from formats.errors import TpDeployError
from runtime.engine.sampling import Sampler, SamplingParams, TokenLogprobs, make_generator
from runtime.engine.scheduler import Scheduler
from runtime.engine.stops import StopChecker, safe_prefix
from runtime.kv.batch import SeqSlice, StepBatch
from runtime.kv.blocks import BlockManager
from runtime.worker.runner import Step

MAX_BATCH_TOKENS = 2048  # new tokens per step: long prompts are prefilled in chunks of at most this
_NO_IDS: tuple[int, ...] = ()  # shared, so a sequence without a repetition penalty allocates nothing per step


@dataclass(eq=False)
class Sequence:
    """One sample being generated (a request with n > 1 has n of them)."""

    seq_id: int
    request: int
    index: int
    prompt: list[int]
    params: SamplingParams
    capacity: int  # prompt + the most tokens it may generate
    generator: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stops: StopChecker = field(default_factory=StopChecker)
    tokens: list[int] = field(default_factory=list)  # prompt + out: what the cache must hold
    computed: int = 0  # leading tokens whose K/V are in the cache
    cached: int = -1  # prompt tokens found in the prefix cache at first admission (-1: not admitted yet)

    def __post_init__(self):
        self.tokens = list(self.prompt) + list(self.out)

    @property
    def text(self) -> str:
        return self.stops.text

    @property
    def context(self) -> int:
        return len(self.tokens)

    def history(self) -> list[int] | tuple[int, ...]:
        """Ids the repetition penalty looks at; only for sequences that use one (hot path)."""
        return self.tokens if self.params.repetition_penalty != 1.0 else _NO_IDS


OnDelta = Callable[[Sequence, str], None]  # streamed text as it becomes final


class Engine:
    def __init__(self, driver, tokenizer, blocks: BlockManager, vocab_size: int, max_model_len: int,
                 max_batch_size: int = 64, seed: int | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS):
        self.driver, self.tokenizer, self.blocks, self.vocab_size = driver, tokenizer, blocks, vocab_size
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(blocks, max_batch_size, max_batch_tokens)
        self.sampler = Sampler(seed, tokenizer.eos_token_ids)
        self._next_id = 0

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 on_delta: OnDelta | None = None) -> list[list[Sequence]]:
        """Generate for every prompt; returns, per prompt, its ``n`` finished sequences."""
        seqs = [self.sequences(r, p, sp) for r, (p, sp) in enumerate(zip(prompts, params))]
        try:
            for s in (s for group in seqs for s in group):
                self.scheduler.add(s)
            while self.scheduler.has_work:
                self.step(on_delta)
        finally:  # an error mid-run must not leak blocks into the next call
            self.abort([s for group in seqs for s in group])
        return seqs

    def sequences(self, request: int, prompt: list[int], params: SamplingParams) -> list[Sequence]:
        """The ``n`` sequences of one request, checked against the context window and the cache."""
        self.check(request, prompt, params)
        return [self._sequence(request, i, prompt, params) for i in range(params.n)]

    def check(self, request: int, prompt: list[int], params: SamplingParams) -> None:
        """Refuse what could never run (no state is touched: safe from any thread)."""
        self._check_prompt(request, prompt)
        need = self._capacity(prompt, params)
        if need > self.blocks.capacity_tokens:
            raise TpDeployError(f"a sequence of {len(prompt)} prompt tokens with room for {need - len(prompt)} new ones "
                                f"needs {need} tokens of KV cache, but the cache holds {self.blocks.capacity_tokens}; "
                                "lower max_tokens, or give the cache more memory (--cache-max-entry-count, "
                                "--kv-cache-tokens, a smaller --kv-dtype)")

    def _capacity(self, prompt: list[int], params: SamplingParams) -> int:
        budget = self.max_model_len - len(prompt)
        return len(prompt) + (budget if params.max_tokens is None else min(params.max_tokens, budget))

    def abort(self, seqs: list[Sequence]) -> None:
        """Stop sequences now (cancelled, disconnected, or an error) and free their blocks."""
        for s in seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
            self.scheduler.remove(s)

    def step(self, on_delta: OnDelta | None = None) -> list[Sequence]:
        """Run one scheduled step on every rank; returns the sequences it sampled a token for."""
        work = self.scheduler.schedule()
        if not work:
            raise TpDeployError("internal: sequences are waiting but none fits the KV cache")
        step = Step(tokens=[t for w in work for t in w.seq.tokens[w.start:w.start + w.new]],
                    batch=StepBatch(tuple(self.scheduler.slice(w) for w in work)))
        logits = self.driver.execute(step)
        self.scheduler.finished_step(work)
        rows = [i for i, w in enumerate(work) if w.sample]
        seqs = [work[i].seq for i in rows]
        if not rows:
            return []
        # s.out is passed as is (no copy): the sampler reads it only for min_tokens and output penalties.
        result = self.sampler.sample(logits[rows], [s.params for s in seqs], [s.generator for s in seqs],
                                     [s.history() for s in seqs], [s.out for s in seqs])
        for s, token, lp in zip(seqs, result.tokens.tolist(), result.logprobs):
            self._advance(s, token, lp, on_delta)
            if s.finish_reason:
                self.scheduler.remove(s)
        return seqs

    def prompt_logits(self, prompt: list[int], chunk: int | None = None) -> torch.Tensor:
        """(T, vocab) float32 logits at every prompt position, through the same path as generation;
        with ``chunk``, the prompt is prefilled ``chunk`` tokens per step, each attending to the cache."""
        self._check_prompt(0, prompt)
        self._next_id += 1
        seq_id, chunk = self._next_id, chunk or len(prompt)
        if not self.blocks.can_grow(seq_id, len(prompt)):
            raise TpDeployError(f"a prompt of {len(prompt)} tokens does not fit in the KV cache "
                                f"({self.blocks.num_free * self.blocks.block_size} tokens free); give the cache more memory")
        table = self.blocks.grow(seq_id, len(prompt))
        try:
            parts = []
            for a in range(0, len(prompt), chunk):
                part = prompt[a:a + chunk]
                batch = StepBatch((SeqSlice(seq_id, len(part), a + len(part), table),))
                parts.append(self.driver.execute(Step(part, batch, all_logits=True)))
        finally:
            self.blocks.free(seq_id)
        return torch.cat(parts)

    def _sequence(self, request: int, index: int, prompt: list[int], params: SamplingParams) -> Sequence:
        # n samples of one seeded request must differ; wrap to stay a valid torch seed.
        seed = None if params.seed is None else (params.seed + index) % 2**63
        self._next_id += 1
        return Sequence(self._next_id, request, index, prompt, params, self._capacity(prompt, params),
                        make_generator(seed), stops=StopChecker(params.stop, params.include_stop_str_in_output))

    def _check_prompt(self, request: int, prompt: list[int]) -> None:
        if not prompt:
            raise TpDeployError(f"prompt {request} is empty; give at least one token")
        if len(prompt) >= self.max_model_len:
            raise TpDeployError(f"prompt {request} has {len(prompt)} tokens but the context window (max_model_len) "
                                f"is {self.max_model_len}; shorten the prompt to leave room for at least one new token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise TpDeployError(f"prompt {request} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    def _advance(self, s: Sequence, token: int, lp: TokenLogprobs | None, on_delta: OnDelta | None) -> None:
        s.out.append(token)
        s.tokens.append(token)
        if lp is not None:
            s.logprobs.append(lp)
        if token in s.params.stop_token_ids or (token in self.tokenizer.eos_token_ids and not s.params.ignore_eos):
            s.finish_reason = "stop"
        elif s.context >= s.capacity:
            s.finish_reason = "length"
        text = self._decode(s)
        # vLLM: a stop string ending within the first min_tokens tokens' text does not count.
        delta, stopped = s.stops.feed(text if s.finish_reason else safe_prefix(text),
                                      check=len(s.out) > s.params.min_tokens)
        if stopped:
            s.finish_reason = "stop"
        elif s.finish_reason:
            delta += s.stops.flush()
        if on_delta and (delta or s.finish_reason):
            on_delta(s, delta)

    def _decode(self, s: Sequence) -> str:
        # As in vLLM, the text of the EOS / stop token that ended the sequence is left out unless
        # include_stop_str_in_output asks for it (its id stays in ``out``).
        by_token = s.finish_reason == "stop" and not s.params.include_stop_str_in_output
        ids = s.out[:-1] if by_token else s.out
        return self.tokenizer.decode(ids, skip_special_tokens=s.params.skip_special_tokens)
