"""What ``Engine.step`` hands back: a ``Delta`` per sample that advanced, and ``EngineStats`` for metrics.

One result channel: a request's text, tokens, logprobs, finish reason and (on its last Delta) its token
counts all travel on the step's return value, so the offline API and the server read the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.engine.sampling import TokenLogprobs


@dataclass(frozen=True)
class Usage:
    """Token counts of a request, all its samples together."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prefix-cache hits

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """New output of one sample (``index`` < n) of a request since its previous Delta."""

    request_id: str
    index: int
    text: str  # newly final text (a tail that may still become a stop string is held back)
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per new token when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last Delta of the sample
    usage: Usage | None = None  # on the request's last Delta: every sample has finished

    @property
    def finished(self) -> bool:
        """The request (not only this sample) is done: no more Deltas will come for it."""
        return self.usage is not None


@dataclass(frozen=True)
class EngineStats:
    """The engine's state for gauges and counters; sequences count each of a request's n samples."""

    running: int  # sequences in the running batch
    waiting: int  # sequences waiting for KV blocks or a batch slot (preempted ones included)
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_queried: int  # prompt tokens looked up in the prefix cache, since start
    prefix_hit: int  # of those, found in the cache
    preemptions: int  # since start

    @property
    def kv_usage(self) -> float:
        """Fraction of KV-cache blocks in use (0.0 to 1.0)."""
        return self.kv_blocks_used / self.kv_blocks_total
