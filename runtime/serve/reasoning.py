"""``--reasoning-parser``: a reasoning model's ``<think>…</think>`` goes to ``reasoning_content``, the rest to
``content`` (and to the tool-call parser).

* ``deepseek_r1``: the chat template opens ``<think>`` in the prompt, so the output starts inside it:
  everything before ``</think>`` is reasoning (all of it while ``</think>`` has not come);
* ``qwen3``: the model writes ``<think>`` itself; an output that does not start with it (thinking switched
  off, ``enable_thinking: false``) is all content.
"""
from __future__ import annotations

from runtime.serve.tools import partial_suffix

OPEN, CLOSE = "<think>", "</think>"


def split(parser: str, text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole output."""
    if parser == "none":
        return None, text
    body = text.lstrip()
    opened = body.startswith(OPEN)
    if parser == "qwen3" and not opened:
        return None, text
    body = body.removeprefix(OPEN) if opened else text
    if CLOSE not in body:
        return (body, "") if parser == "deepseek_r1" or opened else (None, text)
    reasoning, _, content = body.partition(CLOSE)
    return reasoning, content.lstrip("\n")


class ReasoningStream:
    """The same split one delta at a time: each feed sends the part of the split that later text can no
    longer change (a tail that may still become ``</think>`` or ``<think>`` waits), and finish the rest."""

    def __init__(self, parser: str):
        self.parser = parser
        self._text = ""
        self._sent = [0, 0]  # characters of reasoning and of content already sent

    def feed(self, text: str) -> tuple[str, str]:
        self._text += text
        return self._send(*self._settled())

    def finish(self) -> tuple[str, str]:
        reasoning, content = split(self.parser, self._text)
        return self._send(reasoning or "", content)

    def _settled(self) -> tuple[str, str]:
        if self.parser == "none":
            return "", self._text
        stripped = self._text.lstrip()
        if len(stripped) < len(OPEN) and OPEN.startswith(stripped):
            return "", ""  # may still become <think>
        opened = stripped.startswith(OPEN)
        if self.parser == "qwen3" and not opened:
            return "", self._text
        body = stripped.removeprefix(OPEN) if opened else self._text
        if CLOSE in body:
            reasoning, _, content = body.partition(CLOSE)
            return reasoning, content.lstrip("\n")
        return body[:len(body) - partial_suffix(body, CLOSE)], ""

    def _send(self, reasoning: str, content: str) -> tuple[str, str]:
        out = reasoning[self._sent[0]:], content[self._sent[1]:]
        self._sent = [max(self._sent[0], len(reasoning)), max(self._sent[1], len(content))]
        return out
