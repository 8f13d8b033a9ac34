"""Rank 0's request boundary: add a request, step (schedule, run on every rank, sample, detokenize,
stop), abort, stats.

``Engine.add`` is the one place a request is checked; ``Engine.step`` returns a ``Delta`` per sample
that advanced (new text, token ids, logprobs, finish reason, and on a request's last Delta its usage),
the one result channel the offline API and the server both read. ``Scheduler`` decides each step
(continuous batching, chunked prefill, preemption, prefix cache). Text is detokenized incrementally
(a short window of tokens per step, so the work per token does not grow with the output) and passed
through the stop-string checker, which holds back any tail that could still become a stop string.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import torch

from formats.errors import TpDeployError
from runtime.config import DEFAULTS, EngineConfig
from runtime.engine.errors import ContextTooLong, InvalidPrompt
from runtime.engine.grammar import Grammars, Matcher
from runtime.engine.outputs import Delta, EngineStats, Usage
from runtime.engine.sampling import Sampler, SamplingParams, TokenLogprobs, make_generator
from runtime.engine.scheduler import Scheduler
from runtime.engine.stops import StopChecker
from runtime.engine.tokenizer import IncrementalDecoder
from runtime.kv.batch import SeqSlice, StepBatch
from runtime.kv.blocks import BlockManager
from runtime.worker.runner import Step

_NO_IDS: tuple[int, ...] = ()  # shared, so a sequence without a repetition penalty allocates nothing per step


@dataclass(eq=False)
class Sequence:
    """One sample being generated (a request with n > 1 has n of them)."""

    seq_id: int
    request: str  # the request's id
    index: int
    prompt: list[int]
    params: SamplingParams
    capacity: int  # prompt + the most tokens it may generate
    generator: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stops: StopChecker = field(default_factory=StopChecker)
    decoder: IncrementalDecoder | None = None  # text of ``out``, a few tokens at a time
    tokens: list[int] = field(default_factory=list)  # prompt + out: what the cache must hold
    computed: int = 0  # leading tokens whose K/V are in the cache
    cached: int = -1  # prompt tokens found in the prefix cache at first admission (-1: not admitted yet)
    matcher: Matcher | None = None  # structured outputs: where the sample is in its grammar

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


class Engine:
    """add / abort / step / stats: the one request boundary of the runtime (see the module docstring)."""

    def __init__(self, driver, tokenizer, blocks: BlockManager, vocab_size: int, max_model_len: int,
                 config: EngineConfig = DEFAULTS):
        self.driver, self.tokenizer, self.blocks, self.vocab_size = driver, tokenizer, blocks, vocab_size
        self.max_model_len = max_model_len
        # Pipeline stages: keep up to pp steps in flight, so each stage works on one while the next
        # works on another (vLLM's virtual engines); 1 without stages.
        pp = getattr(getattr(driver, "topo", None), "pp", 1)
        self.depth = min(config.pipeline_batches or pp, pp)  # more than pp would only split batches
        self.scheduler = Scheduler(blocks, config.max_batch_size, config.max_prefill_tokens, self.depth)
        self._inflight: deque = deque()  # (work, pending logits) of steps submitted, oldest first
        self.sampler = Sampler(config.seed, tokenizer.eos_token_ids)
        self.grammars = Grammars(tokenizer, vocab_size)  # xgrammar is loaded by the first request with one
        self._next_id = 0
        self._requests: dict[str, list[Sequence]] = {}  # request id -> its samples, until finished

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """What ``add`` would refuse, without touching any state: safe from any thread."""
        check_request(prompt_ids, params, self.max_model_len, self.vocab_size, self.blocks.capacity_tokens)
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)  # an invalid schema is the client's error

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (its ``n`` samples) after the one check of it; raises InvalidPrompt,
        ContextTooLong or TpDeployError (the KV cache could never hold it) and then changes nothing."""
        if request_id in self._requests:
            raise TpDeployError(f"request id {request_id!r} is already in the engine; give each request its own id")
        self.check(prompt_ids, params)
        prompt = list(prompt_ids)
        seqs = [self._sequence(request_id, i, prompt, params) for i in range(params.n)]
        self._requests[request_id] = seqs
        for s in seqs:
            self.scheduler.add(s)

    def abort(self, request_id: str) -> None:
        """End a request now (cancelled, client gone, server fault) and free its blocks at once.
        A finished or unknown id is ignored, so aborting is always safe."""
        for s in self._requests.pop(request_id, ()):
            if s.finish_reason is None:
                s.finish_reason = "abort"
            self.scheduler.remove(s)

    def step(self) -> list[Delta]:
        """Run one scheduled step on every rank; a Delta per sample it sampled a token for, with the
        request's Usage on its last one. A step that raises has ended every request in the engine (their
        blocks are free, the engine stays usable) before the error propagates."""
        try:
            return self._step()
        except BaseException:
            self._inflight.clear()
            for request_id in list(self._requests):
                self.abort(request_id)
            raise

    def drain(self) -> None:
        """Wait for the steps still in flight (their results are dropped): the last stage has sent their
        logits, and rank 0 must take them before the ranks stop."""
        while self._inflight:
            _, pending = self._inflight.popleft()
            pending.result()

    def stats(self) -> EngineStats:
        sched, blocks = self.scheduler, self.blocks
        return EngineStats(len(sched.running), len(sched.waiting), blocks.num_used, blocks.num_blocks,
                           sched.prefix_queried, sched.prefix_hit, sched.preemptions)

    def prompt_logits(self, prompt: list[int], chunk: int | None = None) -> torch.Tensor:
        """(T, vocab) float32 logits at every prompt position, on the host, through the same path as generation;
        with ``chunk``, the prompt is prefilled ``chunk`` tokens per step, each attending to the cache (and the
        device holds only ``chunk`` positions of logits at a time)."""
        check_prompt(prompt, self.max_model_len, self.vocab_size)
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
                batch = StepBatch((SeqSlice(seq_id, len(part), a + len(part), table, self.blocks.tail(seq_id)),))
                # On the host at once: the device holds one chunk's logits (chunk x vocab x 4 B), not the
                # prompt's, which the plan's reserve (sized for server steps) does not cover.
                parts.append(self.driver.execute(Step(part, batch, all_logits=True)).cpu())
        finally:
            self.blocks.free(seq_id)
        return torch.cat(parts)

    def _submit(self) -> None:
        """Fill the pipeline: schedule and start steps until ``depth`` are in flight or nothing is left."""
        while len(self._inflight) < self.depth:
            busy = {w.seq for work, _ in self._inflight for w in work}
            work = self.scheduler.schedule(busy)
            if not work:
                return
            step = Step(tokens=[t for w in work for t in w.seq.tokens[w.start:w.start + w.new]],
                        batch=StepBatch(tuple(self.scheduler.slice(w) for w in work)))
            self._inflight.append((work, self.driver.submit(step)))

    def _step(self) -> list[Delta]:
        self._submit()
        if not self._inflight:
            raise RuntimeError("internal: sequences are waiting but none fits the KV cache")
        work, pending = self._inflight.popleft()
        logits = pending.result()
        # A sequence aborted while its step was in flight is gone: its blocks are free, its row unread.
        alive = [(i, w) for i, w in enumerate(work) if w.seq.finish_reason is None]
        self.scheduler.finished_step([w for _, w in alive])
        rows = [i for i, w in alive if w.sample]
        if not rows:
            return []
        seqs = [work[i].seq for i in rows]
        # s.out is passed as is (no copy): the sampler reads it only for min_tokens and output penalties.
        matchers = [s.matcher for s in seqs]
        constrain = partial(self.grammars.constrain, matchers=matchers) if any(matchers) else None
        rows_logits = logits if len(rows) == logits.shape[0] else logits[rows]  # all rows: no (B, V) copy
        result = self.sampler.sample(rows_logits, [s.params for s in seqs], [s.generator for s in seqs],
                                     [s.history() for s in seqs], [s.out for s in seqs], constrain)
        deltas: list[Delta] = []
        last: dict[str, int] = {}  # request id -> index of its last Delta in this step
        for s, token, lp in zip(seqs, result.tokens.tolist(), result.logprobs):
            deltas.append(self._advance(s, token, lp))
            last[s.request] = len(deltas) - 1
            if s.finish_reason:
                self.scheduler.remove(s)
        for request_id, i in last.items():
            group = self._requests[request_id]
            if all(s.finish_reason for s in group):
                del self._requests[request_id]
                deltas[i] = dataclasses.replace(deltas[i], usage=_usage(group))
        return deltas

    def _sequence(self, request: str, index: int, prompt: list[int], params: SamplingParams) -> Sequence:
        # n samples of one seeded request must differ; wrap to stay a valid torch seed.
        seed = None if params.seed is None else (params.seed + index) % 2**63
        self._next_id += 1
        so = params.structured_outputs
        return Sequence(self._next_id, request, index, prompt, params, _capacity(prompt, params, self.max_model_len),
                        make_generator(seed), stops=StopChecker(params.stop, params.include_stop_str_in_output),
                        decoder=IncrementalDecoder(self.tokenizer, params.skip_special_tokens),
                        matcher=None if so is None else self.grammars.matcher(so))

    def _advance(self, s: Sequence, token: int, lp: TokenLogprobs | None) -> Delta:
        s.out.append(token)
        s.tokens.append(token)
        if token in s.params.stop_token_ids or (token in self.tokenizer.eos_token_ids and not s.params.ignore_eos):
            s.finish_reason = "stop"
        elif s.matcher is not None and (not s.matcher.accept(token) or s.matcher.done):
            s.finish_reason = "stop"  # the grammar is complete (its EOS taken, even with ignore_eos)
        elif s.context >= s.capacity:
            s.finish_reason = "length"
        # As in vLLM, the text of the EOS / stop token that ended the sequence is left out unless
        # include_stop_str_in_output asks for it (its id stays in ``out``).
        by_token = s.finish_reason == "stop" and not s.params.include_stop_str_in_output
        new = "" if by_token else s.decoder.add(token)
        if s.finish_reason:
            new += s.decoder.finish()  # a character still incomplete at the end is final now
        # vLLM: a stop string ending within the first min_tokens tokens' text does not count.
        text, stopped = s.stops.extend(new, check=len(s.out) > s.params.min_tokens)
        if stopped:
            s.finish_reason = "stop"
        elif s.finish_reason:
            text += s.stops.flush()
        return Delta(s.request, s.index, text, [token], [] if lp is None else [lp], s.finish_reason)


def check_prompt(prompt: list[int], max_model_len: int, vocab_size: int) -> None:
    """Refuse a prompt that could never run: empty, no room for one new token, or ids past the vocabulary."""
    if not prompt:
        raise InvalidPrompt("the prompt is empty; give at least one token")
    if len(prompt) >= max_model_len:
        raise ContextTooLong(f"the prompt has {len(prompt)} tokens but the context window (max_model_len) is "
                             f"{max_model_len}, this model's maximum context length; shorten the prompt to leave room "
                             "for at least one new token")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        raise InvalidPrompt(f"prompt token ids {bad[:5]} are out of range: this model's vocabulary has ids "
                            f"0..{vocab_size - 1}")


def check_request(prompt: list[int], params: SamplingParams, max_model_len: int, vocab_size: int,
                  cache_tokens: int) -> None:
    """The one check of a request (``Engine.add``): its prompt, its context window and the KV cache."""
    check_prompt(prompt, max_model_len, vocab_size)
    if params.max_tokens is not None and len(prompt) + params.max_tokens > max_model_len:
        raise ContextTooLong(
            f"this model's maximum context length is {max_model_len} tokens, but you requested "
            f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the prompt, {params.max_tokens} for the "
            "completion); shorten the prompt or lower max_tokens")
    need = _capacity(prompt, params, max_model_len)
    if need > cache_tokens:
        raise TpDeployError(f"a sequence of {len(prompt)} prompt tokens with room for {need - len(prompt)} new ones "
                            f"needs {need} tokens of KV cache, but the cache holds {cache_tokens}; "
                            "lower max_tokens, or give the cache more memory (--cache-max-entry-count, "
                            "--kv-cache-tokens, a smaller --kv-dtype)")


def _capacity(prompt: list[int], params: SamplingParams, max_model_len: int) -> int:
    """Prompt plus the most tokens a sample may generate: max_tokens, or up to the context window."""
    budget = max_model_len - len(prompt)
    return len(prompt) + (budget if params.max_tokens is None else min(params.max_tokens, budget))


def _usage(group: list[Sequence]) -> Usage:
    return Usage(len(group[0].prompt), sum(len(s.out) for s in group), max(0, min(s.cached for s in group)))
