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
from runtime.kv_cache import SeqSlice, StepBatch
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
    def __init__(self, driver, tokenizer, vocab_size: int, max_model_len: int, max_batch_size: int = 64,
                 seed: int | None = None):
        self.driver, self.tokenizer, self.vocab_size = driver, tokenizer, vocab_size
        self.max_model_len, self.max_batch_size = max_model_len, max_batch_size
        self.sampler = Sampler(seed)
        self._next_id = 0

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 on_delta: OnDelta | None = None) -> list[list[Sequence]]:
        """Generate for every prompt; returns, per prompt, its ``n`` finished sequences."""
        seqs = [[self._sequence(r, i, p, sp) for i in range(sp.n)] for r, (p, sp) in enumerate(zip(prompts, params))]
        waiting, running, to_free = deque(s for group in seqs for s in group), [], []
        while waiting or running:
            new = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch_size - len(running)))]
            step_seqs = new + running
            step = Step(tokens=[t for s in new for t in s.prompt] + [s.out[-1] for s in running],
                        batch=StepBatch(tuple(SeqSlice(s.seq_id, len(s.prompt), len(s.prompt)) for s in new)
                                        + tuple(SeqSlice(s.seq_id, 1, s.context) for s in running)),
                        allocate=tuple((s.seq_id, s.capacity) for s in new), free=tuple(to_free))
            logits = self.driver.execute(step)
            result = self.sampler.sample(logits, [s.params for s in step_seqs], [s.generator for s in step_seqs],
                                         [s.history() for s in step_seqs])
            to_free = []
            for s, token, lp in zip(step_seqs, result.tokens.tolist(), result.logprobs):
                self._advance(s, token, lp, on_delta)
                if s.finish_reason:
                    to_free.append(s.seq_id)
            running = [s for s in step_seqs if not s.finish_reason]
        self._free(to_free)
        return seqs

    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """(T, vocab) float32 logits at every prompt position, through the same path as generation."""
        self._check_prompt(0, prompt)
        self._next_id += 1
        seq_id = self._next_id
        batch = StepBatch((SeqSlice(seq_id, len(prompt), len(prompt)),))
        logits = self.driver.execute(Step(prompt, batch, allocate=((seq_id, len(prompt)),), all_logits=True))
        self._free([seq_id])
        return logits

    def _free(self, seq_ids: list[int]) -> None:
        """Release caches on every rank with a step that runs no forward."""
        if seq_ids:
            self.driver.execute(Step(tokens=[], batch=StepBatch(()), free=tuple(seq_ids)))

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
