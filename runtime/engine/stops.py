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

* ``extend`` takes the NEW text since the previous call (the engine passes its incremental decoder's
  deltas). Each call looks only at that text and the few characters before it that a stop string could
  span, so the work per token does not grow with the length of the output.
* ``feed`` takes the FULL text decoded so far, for callers that re-decode. It should only ever extend
  what was fed before: text already emitted cannot be taken back. If a decoder rewrites earlier text
  anyway (e.g. ``clean_up_tokenization_spaces`` turning "a ," into "a,"), the stream carries on from the
  same character offset rather than failing; ``text`` always reflects the latest decode.
* A byte-level tokenizer may decode a partial multi-byte character as U+FFFD. While generating, never
  pass such a placeholder (the incremental decoder holds it back; full-text callers pass
  ``safe_prefix(text)``). When generation ends without a stop (EOS, max_tokens), pass the rest of the
  text as is and then call ``flush``.
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
        # A stop string ending in new text starts at most this many characters before it.
        self._reach = max((len(s) for s in self._stops), default=1) - 1
        # A held tail is a proper prefix of some stop string, so never longer than the reach.
        self._max_hold = 0 if include_in_output else self._reach
        self._pieces: list[str] = []  # everything fed so far, cut at the stop once stopped
        self._length = 0  # of the text in _pieces
        self._tail = ""  # its last _reach characters: where a stop ending in the next text may start
        self._emitted = 0  # characters handed out (past _length only after a rewrite, see feed)
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        """The final text so far: emitted plus held back, cut before the stop string (after it with
        include_in_output)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def extend(self, new: str, check: bool = True) -> tuple[str, bool]:
        """Return ``(new text safe to show now, stopped)`` for the text decoded since the last call.

        ``check=False`` (still within min_tokens): no stop string may end in ``new``; tails that could
        grow into one are held back all the same.
        """
        if self._stopped:
            return "", True
        window = self._tail + new  # window[0] is the character at offset `origin` of the text
        origin = self._length - len(self._tail)
        done = self._emitted - origin  # window[:done] was handed out already
        cut = self._find_stop(window, len(self._tail)) if check else None
        if cut is not None:
            self._pieces = [self.text[:origin] + window[:cut]]
            self._length, self._tail, self._stopped = origin + cut, "", True
            emit = window[done:cut] if cut > done else ""
            self._emitted = max(self._emitted, origin + cut)
            return emit, True
        self._pieces.append(new)
        self._length += len(new)
        self._tail = window[-self._reach:] if self._reach else ""
        end = len(window) - self._held_length(window, done)
        emit = window[done:end] if end > done else ""
        self._emitted = max(self._emitted, origin + end)
        return emit, False

    def feed(self, text: str, check: bool = True) -> tuple[str, bool]:
        """``extend`` for callers that pass the full text decoded so far (see the module docstring)."""
        if self._stopped:
            return "", True
        old = self.text
        if not text.startswith(old):
            # The decoder rewrote earlier text: carry on from the common prefix, so that any stop
            # overlapping the first changed character counts; what was emitted stays emitted.
            common = text[:len(os.path.commonprefix((text, old)))]
            self._pieces, self._length = [common], len(common)
            self._tail = common[-self._reach:] if self._reach else ""
            old = common
        return self.extend(text[len(old):], check)

    def flush(self) -> str:
        """Release the held-back tail when generation ended without a stop string."""
        if self._stopped or self._emitted >= self._length:
            return ""
        emit = self._tail[len(self._tail) - (self._length - self._emitted):]
        self._emitted = self._length
        return emit

    def _find_stop(self, window: str, start: int) -> int | None:
        """Where the text ends because of a stop string ending past ``window[:start]``, or None.

        Without include_in_output the earliest-starting stop wins and the text ends before it; with it,
        the earliest-ending one wins and the text ends after it, which is where a stream fed one character
        at a time would stop too.
        """
        # A stop ending past `start` starts at most len(stop) - 1 characters before it.
        found = [(window.find(s, max(0, start - len(s) + 1)), len(s)) for s in self._stops]
        cuts = [pos + size if self._include else pos for pos, size in found if pos >= 0]
        return min(cuts) if cuts else None

    def _held_length(self, window: str, done: int) -> int:
        """Length of the longest tail of ``window[done:]`` (not handed out yet) that is a proper prefix
        of some stop string."""
        longest = min(self._max_hold, len(window) - done)
        for size in range(longest, 0, -1):
            tail = window[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
