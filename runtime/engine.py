"""Rank 0's generation loop: batch the sequences, run a step on every rank, sample, detokenize, stop.

Every step packs the prompts of newly admitted sequences with one token of each running sequence,
so new requests join a running batch without waiting for it to drain. Text is re-decoded from all
generated ids each step (exactly ``decode(ids)``), then passed through the stop-string checker,
which holds back any tail that could still become a stop string.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from formats.errors import TpDeployError
from runtime.kv.batch import SeqSlice, StepBatch
from runtime.kv.blocks import BlockManager
from runtime.runner import Step
from runtime.sampling import Sampler, SamplingParams, TokenLogprobs, make_generator
from runtime.stops import StopChecker, safe_prefix


@dataclass
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

    @property
    def text(self) -> str:
        return self.stops.text

    @property
    def context(self) -> int:
        return len(self.prompt) + len(self.out)

    def history(self) -> list[int]:
        """Ids the repetition penalty looks at; built only for sequences that use one (hot path)."""
        return self.prompt + self.out if self.params.repetition_penalty != 1.0 else []


OnDelta = Callable[[Sequence, str], None]  # streamed text as it becomes final


class Engine:
    def __init__(self, driver, tokenizer, blocks: BlockManager, vocab_size: int, max_model_len: int,
                 max_batch_size: int = 64, seed: int | None = None):
        self.driver, self.tokenizer, self.blocks, self.vocab_size = driver, tokenizer, blocks, vocab_size
        self.max_model_len, self.max_batch_size = max_model_len, max_batch_size
        self.sampler = Sampler(seed)
        self._next_id = 0

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 on_delta: OnDelta | None = None) -> list[list[Sequence]]:
        """Generate for every prompt; returns, per prompt, its ``n`` finished sequences."""
        seqs = [[self._sequence(r, i, p, sp) for i in range(sp.n)] for r, (p, sp) in enumerate(zip(prompts, params))]
        waiting, running = deque(s for group in seqs for s in group), []
        try:
            while waiting or running:
                new = self._admit(waiting, len(running))
                step_seqs = new + running
                step = Step(tokens=[t for s in new for t in s.prompt] + [s.out[-1] for s in running],
                            batch=StepBatch(tuple(self._slice(s, len(s.prompt)) for s in new)
                                            + tuple(self._slice(s, 1) for s in running)))
                logits = self.driver.execute(step)
                result = self.sampler.sample(logits, [s.params for s in step_seqs], [s.generator for s in step_seqs],
                                             [s.history() for s in step_seqs])
                for s, token, lp in zip(step_seqs, result.tokens.tolist(), result.logprobs):
                    self._advance(s, token, lp, on_delta)
                    if s.finish_reason:
                        self.blocks.free(s.seq_id)
                running = [s for s in step_seqs if not s.finish_reason]
        finally:  # an error mid-run must not leak blocks into the next call
            for s in list(waiting) + running:
                self.blocks.free(s.seq_id)
        return seqs

    def _admit(self, waiting: deque, running: int) -> list[Sequence]:
        """Waiting sequences that fit: a batch slot and cache blocks for their whole budget (reserved now,
        so a running sequence never runs out mid-generation)."""
        new = []
        while waiting and running + len(new) < self.max_batch_size and self.blocks.can_grow(waiting[0].seq_id,
                                                                                              waiting[0].capacity):
            s = waiting.popleft()
            self.blocks.grow(s.seq_id, s.capacity)
            new.append(s)
        if waiting and not new and not running:
            s = waiting[0]
            raise TpDeployError(f"a sequence of {len(s.prompt)} prompt tokens with room for {s.capacity - len(s.prompt)} "
                                f"new ones needs {s.capacity} tokens of KV cache, but the cache holds "
                                f"{self.blocks.capacity_tokens}; lower max_tokens, or give the cache more memory "
                                "(--cache-max-entry-count, --kv-cache-tokens, a smaller --kv-dtype)")
        return new

    def _slice(self, s: Sequence, new: int) -> SeqSlice:
        return SeqSlice(s.seq_id, new, s.context, tuple(self.blocks.tables[s.seq_id]))

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
            parts = [self.driver.execute(Step(prompt[a:a + chunk], StepBatch((SeqSlice(
                seq_id, len(prompt[a:a + chunk]), a + len(prompt[a:a + chunk]), table),)), all_logits=True))
                for a in range(0, len(prompt), chunk)]
        finally:
            self.blocks.free(seq_id)
        return torch.cat(parts)

    def _sequence(self, request: int, index: int, prompt: list[int], params: SamplingParams) -> Sequence:
        self._check_prompt(request, prompt)
        budget = self.max_model_len - len(prompt)
        max_new = budget if params.max_tokens is None else min(params.max_tokens, budget)
        # n samples of one seeded request must differ; wrap to stay a valid torch seed.
        seed = None if params.seed is None else (params.seed + index) % 2**63
        self._next_id += 1
        return Sequence(self._next_id, request, index, prompt, params, len(prompt) + max_new,
                        make_generator(seed), stops=StopChecker(params.stop))

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
        if lp is not None:
            s.logprobs.append(lp)
        if token in s.params.stop_token_ids or (token in self.tokenizer.eos_token_ids and not s.params.ignore_eos):
            s.finish_reason = "stop"
        elif s.context >= s.capacity:
            s.finish_reason = "length"
        text = self.tokenizer.decode(s.out, skip_special_tokens=s.params.skip_special_tokens)
        delta, stopped = s.stops.feed(text if s.finish_reason else safe_prefix(text))
        if stopped:
            s.finish_reason = "stop"
        elif s.finish_reason:
            delta += s.stops.flush()
        if on_delta and (delta or s.finish_reason):
            on_delta(s, delta)
