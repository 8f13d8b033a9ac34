"""What the engine refuses to run, as types its callers can map (the HTTP layer: 400 with ``param``).

A request is checked once, by ``Engine.add``; these are its user errors. Anything else a step raises
is a server fault, never the client's (the HTTP layer answers 500).
"""
from __future__ import annotations

from formats.errors import TpDeployError


class InvalidPrompt(TpDeployError):
    """The prompt can never run: empty, or token ids outside the model's vocabulary."""


class ContextTooLong(InvalidPrompt):
    """The prompt, or the prompt plus max_tokens, does not fit the context window (max_model_len)."""
