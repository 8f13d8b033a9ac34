"""Stop strings over streamed, incrementally detokenized text, independent of any tokenizer.

Why it is subtle: a stop string usually spans several tokens ("o wo" = "Hel|lo| wor|ld"), so the
sampler cannot see it, and a stream that naively printed each token would already have shown "o" and
" wo" by the time the match completes. ``StopChecker`` therefore holds back any tail of the text that
could still grow into a stop string and only releases it once it provably cannot. As in the OpenAI API
and vLLM, the stop string itself and everything after it are never emitted.

Caller contract:

* ``feed`` takes the FULL text decoded so far (the caller re-decodes). It should only ever extend what
  was fed before: text already emitted cannot be taken back. If a decoder rewrites earlier text anyway
  (e.g. ``clean_up_tokenization_spaces`` turning "a ," into "a,"), the stream carries on from the same
  character offset rather than failing; ``text`` always reflects the latest decode.
* A byte-level tokenizer may decode a partial multi-byte character as U+FFFD. While generating, pass
  ``safe_prefix(text)`` so such a placeholder is never emitted or matched. When generation ends
  without a stop (EOS, max_tokens), feed the complete decoded text as is and then call ``flush``.
"""
from __future__ import annotations

import os

from formats.errors import TpDeployError

REPLACEMENT_CHAR = "\ufffd"


def safe_prefix(text: str) -> str:
    """``text`` without a trailing run of U+FFFD, which may be a multi-byte character still arriving."""
    return text.rstrip(REPLACEMENT_CHAR)


class StopChecker:
    """Tracks one sequence's stream: what was emitted, what is held back, and whether it stopped."""

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        for s in stop:
            if not isinstance(s, str) or s == "":
                raise TpDeployError(f"stop strings must be non-empty str, got {s!r}")
        self._stops = tuple(stop)
        # A held tail is a proper prefix of some stop string, so it is never longer than this.
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""  # everything fed so far, cut before the stop once stopped
        self._emitted = 0  # length of self._text already handed out
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        """The final text so far: emitted plus held back, truncated before the stop string."""
        return self._text

    def feed(self, text: str) -> tuple[str, bool]:
        """Return ``(new text safe to show now, stopped)`` for the full text decoded so far."""
        if self._stopped:
            return "", True
        emitted = self._text[: self._emitted]
        # A stop cannot begin inside emitted text (its start would have been a held-back tail), unless
        # the decoder rewrote that text; then any stop overlapping the first changed character counts.
        start = self._emitted
        if not text.startswith(emitted):
            start = max(0, len(os.path.commonprefix((text, emitted))) - self._max_hold)
        cut = self._find_stop(text, start)
        if cut is not None:
            emit = text[self._emitted:cut]
            self._text, self._emitted, self._stopped = text[:cut], max(cut, self._emitted), True
            return emit, True
        end = len(text) - self._held_length(text)
        emit = text[self._emitted:end]
        self._text, self._emitted = text, max(end, self._emitted)
        return emit, False

    def flush(self) -> str:
        """Release the held-back tail when generation ended without a stop string."""
        if self._stopped:
            return ""
        emit = self._text[self._emitted:]
        self._emitted = len(self._text)
        return emit

    def _find_stop(self, text: str, start: int) -> int | None:
        """Index where the earliest stop string starts (at or after ``start``), or None."""
        hits = [pos for pos in (text.find(s, start) for s in self._stops) if pos >= 0]
        return min(hits) if hits else None

    def _held_length(self, text: str) -> int:
        """Length of the longest not-yet-emitted tail that is a proper prefix of some stop string."""
        longest = min(self._max_hold, len(text) - self._emitted)
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
