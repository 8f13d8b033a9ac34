"""What the HTTP layer needs from the engine, and nothing more (so each side is testable alone).

The engine runs its step loop in a background thread; the HTTP layer lives on uvicorn's event loop
and consumes one async stream of ``Delta`` per request (the engine's own step outputs; a request's
last Delta carries its ``Usage``). Errors say whose fault a failure is: the client's (InvalidPrompt,
ContextTooLong, any TpDeployError: HTTP 400), the load (Overloaded: 429), the server's state
(ServiceUnavailable: 503) or the server itself (ServerError, or anything else: 500).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from formats.errors import TpDeployError
from runtime.engine.errors import ContextTooLong, InvalidPrompt
from runtime.engine.outputs import Delta, Usage
from runtime.engine.sampling import SamplingParams

__all__ = ["ContextTooLong", "Delta", "EngineClient", "InvalidPrompt", "Overloaded", "ServerError",
           "ServiceUnavailable", "Usage"]


class Overloaded(TpDeployError):
    """Admission refused: more requests waiting than ``--max-queue`` allows (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ServiceUnavailable(Exception):
    """The server cannot finish the request through no fault of the client: it is shutting down, or a
    rank died (HTTP 503, or an in-band error with ``finish_reason: "error"`` once streaming)."""


class ServerError(Exception):
    """A step failed while the request was in it: the server's fault, not the client's (HTTP 500
    ``server_error``, or in-band once streaming); the server keeps serving other requests."""


class EngineClient(Protocol):
    max_model_len: int
    tokenizer: Any  # runtime.engine.tokenizer.Tokenizer: encode, decode, apply_chat_template

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Deltas of every sample until each has a finish_reason; the last one carries the usage. Raises
        Overloaded, InvalidPrompt, ContextTooLong or TpDeployError *before* the first Delta, ServerError or
        ServiceUnavailable at any point. Closing the iterator early aborts the request and frees its cache
        blocks at once."""

    def abort_all(self, error: ServiceUnavailable) -> None:
        """End every queued and running request with ``error`` and refuse new ones with it (shutdown)."""

    def metrics_text(self) -> bytes:
        """Prometheus exposition of the engine's gauges and counters."""
