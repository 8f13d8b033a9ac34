"""What the HTTP layer needs from the engine, and nothing more (so each side is testable alone).

The engine runs its step loop in a background thread; the HTTP layer lives on uvicorn's event loop
and consumes one async stream of ``Delta`` per request.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from formats.errors import TpDeployError
from runtime.engine.sampling import SamplingParams, TokenLogprobs


class Overloaded(TpDeployError):
    """Admission refused: more requests waiting than ``--max-queue`` allows (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ContextTooLong(TpDeployError):
    """prompt + max_tokens exceed the context window (HTTP 400 with the numbers)."""


class ServiceUnavailable(Exception):
    """The server cannot finish the request through no fault of the client: it is shutting down, or a
    rank died (HTTP 503, or an in-band error with ``finish_reason: "error"`` once streaming)."""


@dataclass(frozen=True)
class Delta:
    """New output of one sample (``index`` < n) of a request since its previous Delta."""

    index: int
    text: str  # newly final text (stop strings held back, never emitted)
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per new token when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last Delta of the sample


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prefix-cache hits

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EngineClient(Protocol):
    max_model_len: int
    tokenizer: Any  # runtime.tokenizer.Tokenizer: encode, decode, apply_chat_template

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Deltas of every sample until each has a finish_reason. Raises Overloaded, ContextTooLong or
        TpDeployError *before* the first Delta. Closing the iterator early aborts the request and
        frees its cache blocks at once."""

    def usage(self, request_id: str) -> Usage:
        """Token counts of a request (valid after its stream ended)."""

    def abort_all(self, error: ServiceUnavailable) -> None:
        """End every queued and running request with ``error`` and refuse new ones with it (shutdown)."""

    def metrics_text(self) -> bytes:
        """Prometheus exposition of the engine's gauges and counters."""
