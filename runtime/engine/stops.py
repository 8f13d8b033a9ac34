"""Stop strings over streamed, incrementally detokenized text, independent of any tokenizer.

Why it is subtle: a stop string usually spans several tokens ("o wo" = "Hel|lo| wor|ld"), so the
sampler cannot see it, and a stream that naively printed each token would already have shown "o" and
" wo" by the time the match completes. ``StopChecker`` therefore holds back any tail of the text that
could still grow into a stop string and only releases it once it provably cannot. As in the OpenAI API
and vLLM, the stop string itself and everything after it are never emitted, unless
``include_in_output`` (vLLM's ``include_stop_str_in_output``) keeps the stop string: then the text ends
right after it, and nothing is held back, since text before the stop's end is shown either way.

As in vLLM, a stop string only counts if it ends in text produced after the first ``min_tokens``
tokens: the caller passes ``check=False`` while it has generated no more than min_tokens.

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

    def __init__(self, stop: tuple[str, ...] = (), include_in_output: bool = False) -> None:
        for s in stop:
            if not isinstance(s, str) or s == "":
                raise TpDeployError(f"stop strings must be non-empty str, got {s!r}")
        self._stops = tuple(stop)
        self._include = include_in_output
        # A held tail is a proper prefix of some stop string, so it is never longer than this.
        longest = max((len(s) for s in self._stops), default=1)
        self._max_hold = 0 if include_in_output else longest - 1
        self._text = ""  # everything fed so far, cut at the stop once stopped
        self._emitted = 0  # length of self._text already handed out
        self._checked = 0  # a stop ending at or before this offset was looked for already (or is exempt)
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        """The final text so far: emitted plus held back, cut before the stop string (after it with
        include_in_output)."""
        return self._text

    def feed(self, text: str, check: bool = True) -> tuple[str, bool]:
        """Return ``(new text safe to show now, stopped)`` for the full text decoded so far.

        ``check=False`` (still within min_tokens): no stop string may end in this text; tails that could
        grow into one are held back all the same.
        """
        if self._stopped:
            return "", True
        if not text.startswith(self._text):
            # The decoder rewrote earlier text: any stop overlapping the first changed character counts.
            self._checked = min(self._checked, len(os.path.commonprefix((text, self._text))))
        cut = self._find_stop(text) if check else None
        if cut is not None:
            emit = text[self._emitted:cut]
            self._text, self._emitted, self._stopped = text[:cut], max(cut, self._emitted), True
            return emit, True
        end = len(text) - self._held_length(text)
        emit = text[self._emitted:end]
        self._text, self._emitted, self._checked = text, max(end, self._emitted), len(text)
        return emit, False

    def flush(self) -> str:
        """Release the held-back tail when generation ended without a stop string."""
        if self._stopped:
            return ""
        emit = self._text[self._emitted:]
        self._emitted = len(self._text)
        return emit

    def _find_stop(self, text: str) -> int | None:
        """Where the text ends because of a stop string that ends past ``_checked``, or None.

        Without include_in_output the earliest-starting stop wins and the text ends before it; with it,
        the earliest-ending one wins and the text ends after it, which is where a stream fed one character
        at a time would stop too.
        """
        # A stop ending past _checked starts at most len(stop) - 1 characters before it.
        found = [(text.find(s, max(0, self._checked - len(s) + 1)), len(s)) for s in self._stops]
        cuts = [pos + size if self._include else pos for pos, size in found if pos >= 0]
        return min(cuts) if cuts else None

    def _held_length(self, text: str) -> int:
        """Length of the longest not-yet-emitted tail that is a proper prefix of some stop string."""
        longest = min(self._max_hold, len(text) - self._emitted)
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
