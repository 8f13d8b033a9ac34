"""Stop strings in a stream: cut across token boundaries, never leak a partial stop, flush the rest."""
import itertools
import random

import pytest

from formats.errors import TpDeployError
from runtime.engine.stops import StopChecker, safe_prefix


def stream(pieces: list[str], stop: tuple[str, ...], flush: bool = True, include: bool = False,
           min_tokens: int = 0) -> tuple[list[str], bool, StopChecker]:
    """Feed the growing text token by token (the caller re-decodes); return every emitted chunk.

    Like the engine, stop strings are only checked once more than ``min_tokens`` pieces were fed."""
    checker, chunks, text, stopped = StopChecker(stop, include_in_output=include), [], "", False
    for count, piece in enumerate(pieces, start=1):
        text += piece
        emit, stopped = checker.feed(text, check=count > min_tokens)
        chunks.append(emit)
        if stopped:
            break
    if flush and not stopped:
        chunks.append(checker.flush())
    return chunks, stopped, checker


def test_stop_across_tokens_never_leaks():
    pieces = ["Hel", "lo", " wor", "ld", "!"]
    chunks, stopped, checker = stream(pieces, ("o wo",))
    assert stopped
    assert "".join(chunks) == "Hell"
    assert checker.text == "Hell"
    # "o", "o ", "o w" are prefixes of the stop: none of them may have been shown at any point
    shown = list(itertools.accumulate(chunks))
    assert all("o" not in s for s in shown)
    assert chunks == ["Hel", "l", ""]  # the "o" of "lo" is held until " wor" completes the stop


def test_hold_back_then_release_when_not_a_stop():
    checker = StopChecker(("STOP",))
    assert checker.feed("abc ST") == ("abc ", False)  # "ST" could start "STOP"
    assert checker.text == "abc ST"
    assert checker.feed("abc STA") == ("STA", False)  # "STA" cannot: released
    assert checker.feed("abc STA S") == (" ", False)
    assert checker.flush() == "S"  # generation ended (EOS / length) with "S" still held
    assert checker.flush() == ""


def test_flush_after_stop_is_empty():
    chunks, stopped, checker = stream(["a", "b", "X"], ("bX",), flush=False)
    assert stopped and "".join(chunks) == "a"
    assert checker.flush() == ""
    assert checker.feed("abX and more") == ("", True)


@pytest.mark.parametrize("stops, text, expected", [
    pytest.param(("world", "lo w"), "Hello world", "Hel", id="later-listed-stop-occurs-first"),
    pytest.param(("lo w", "world"), "Hello world", "Hel", id="earlier-listed-stop-occurs-first"),
    pytest.param(("ab", "abc"), "xxabc", "xx", id="overlapping-stops-same-start"),
    pytest.param(("c", "abc"), "xabc", "x", id="longer-starts-first-same-end"),
])
@pytest.mark.parametrize("tokens", ["char-by-char", "one-chunk"])
def test_multiple_stops_earliest_wins(stops, text, expected, tokens):
    pieces = list(text) if tokens == "char-by-char" else [text]  # one chunk: all stops complete at once
    chunks, stopped, checker = stream(pieces, stops)
    assert stopped
    assert "".join(chunks) == expected == checker.text


def test_stop_completed_first_wins_when_streaming():
    # "bc" completes on token "c", before "abcd" can; in one chunk "abcd" starts earlier and wins
    chunks, _, _ = stream(list("xabcd"), ("bc", "abcd"))
    assert "".join(chunks) == "xa"
    assert StopChecker(("bc", "abcd")).feed("xabcd") == ("x", True)


def test_no_stops_emits_immediately():
    pieces = ["Hel", "lo", " wor", "ld"]
    chunks, stopped, _ = stream(pieces, ())
    assert not stopped
    assert chunks == pieces + [""]  # nothing was ever held for flush


def test_stop_at_start_gives_empty_output():
    chunks, stopped, checker = stream(["<|", "end", "|>", "tail"], ("<|end|>",))
    assert stopped
    assert "".join(chunks) == "" and checker.text == ""


def test_stop_inside_one_token():
    chunks, stopped, _ = stream(["ab", "c\n\nd", "e"], ("\n\n",))
    assert stopped and "".join(chunks) == "abc"


def test_text_without_stop_fully_emitted_after_flush():
    pieces = ["It", " is", " o", "k", " w", "ow"]
    chunks, stopped, checker = stream(pieces, ("o wo",))
    assert not stopped
    assert "".join(chunks) == "It is ok wow" == checker.text


def test_rewritten_earlier_text_does_not_crash_and_still_stops():
    # a decoder with clean_up_tokenization_spaces turns "Hi ," into "Hi," once the comma arrives
    checker = StopChecker(("i,",))
    assert checker.feed("Hi ") == ("Hi ", False)
    assert checker.feed("Hi,") == ("", True)  # the stop now starts inside already emitted text
    assert checker.text == "H"
    plain = StopChecker(())
    assert plain.feed("a  b") == ("a  b", False)
    assert plain.feed("a b") == ("", False)  # shorter than what was shown: nothing new, offset stays 4
    assert plain.feed("a b c") == ("c", False)  # best effort: carries on from offset 4, never re-emits
    assert plain.text == "a b c"


def test_empty_stop_string_rejected():
    with pytest.raises(TpDeployError, match="stop strings must be non-empty"):
        StopChecker(("",))


@pytest.mark.parametrize("text, expected", [
    pytest.param("abc", "abc", id="clean"),
    pytest.param("ab\ufffd", "ab", id="one-partial"),
    pytest.param("ab\ufffd\ufffd", "ab", id="run-of-partials"),
    pytest.param("a\ufffdb", "a\ufffdb", id="inner-kept"),
    pytest.param("\ufffd", "", id="only-partial"),
    pytest.param("", "", id="empty"),
])
def test_safe_prefix(text, expected):
    assert safe_prefix(text) == expected


def test_partial_utf8_is_not_emitted_before_it_completes():
    checker = StopChecker(())
    assert checker.feed(safe_prefix("caf\ufffd")) == ("caf", False)
    assert checker.feed(safe_prefix("café")) == ("é", False)


def test_include_stop_str_ends_text_with_the_stop_across_tokens():
    chunks, stopped, checker = stream(["Hel", "lo", " wor", "ld", "!"], ("o wo",), include=True)
    assert stopped
    assert "".join(chunks) == "Hello wo" == checker.text
    # nothing needs holding back: text before the stop's end is shown either way (vLLM buffers nothing here)
    assert chunks == ["Hel", "lo", " wo"]  # the final delta completes the stop and drops "r"


@pytest.mark.parametrize("tokens", ["char-by-char", "one-chunk"])
def test_include_stop_str_drops_text_after_it_in_the_same_token(tokens):
    text = "abc\n\nde"
    pieces = list(text) if tokens == "char-by-char" else ["ab", "c\n\nd", "e"]
    chunks, stopped, checker = stream(pieces, ("\n\n",), include=True)
    assert stopped and "".join(chunks) == "abc\n\n" == checker.text
    assert checker.flush() == "" and checker.feed(text + "more") == ("", True)


def test_include_stop_str_first_completed_stop_wins():
    # the text ends where the first stop completes, however the text was split into tokens
    for pieces in (list("xabcd"), ["xabcd"]):
        chunks, _, checker = stream(pieces, ("abcd", "bc"), include=True)
        assert "".join(chunks) == "xabc" == checker.text


def test_include_stop_str_at_start_and_without_a_stop():
    chunks, stopped, _ = stream(["<|", "end", "|>", "tail"], ("<|end|>",), include=True)
    assert stopped and "".join(chunks) == "<|end|>"
    chunks, stopped, checker = stream(["It", " is", " o", "k"], ("o wo",), include=True)
    assert not stopped and "".join(chunks) == "It is ok" == checker.text


def test_min_tokens_ignores_stops_that_end_before_the_boundary():
    # vLLM: a stop string counts only if it ends in text of tokens after the first min_tokens
    chunks, stopped, checker = stream(["a", "X", "b", "X", "c"], ("X",), min_tokens=2)
    assert stopped and "".join(chunks) == "aXb" == checker.text
    chunks, stopped, _ = stream(["a", "X", "b", "X", "c"], ("X",), min_tokens=4)
    assert not stopped and "".join(chunks) == "aXbXc"


def test_min_tokens_stop_may_start_before_the_boundary_if_it_ends_after():
    # "o wo" starts in the 2nd token ("lo") and ends in the 3rd: after min_tokens=2 it still stops
    chunks, stopped, checker = stream(["Hel", "lo", " wor", "ld"], ("o wo",), min_tokens=2)
    assert stopped and "".join(chunks) == "Hell" == checker.text
    assert all("o" not in c for c in chunks)  # held back even while stops were not checked yet
    chunks, stopped, _ = stream(["Hel", "lo", " wor", "ld"], ("o wo",), min_tokens=3)
    assert not stopped and "".join(chunks) == "Hello world"


def test_min_tokens_with_include_stop_str():
    chunks, stopped, checker = stream(["ab", "STOP", "cd", "ST", "OPef"], ("STOP",), include=True, min_tokens=2)
    assert stopped and "".join(chunks) == "abSTOPcdSTOP" == checker.text


# --- the incremental feed against the full-text checker it replaced ------------------------------

class FullTextChecker:
    """The checker before ``extend``: it took the whole text every time (kept here as the reference)."""

    def __init__(self, stop, include):
        self._stops, self._include = tuple(stop), include
        self._max_hold = 0 if include else max((len(s) for s in stop), default=1) - 1
        self.text, self._emitted, self._checked, self._stopped = "", 0, 0, False

    def feed(self, text, check=True):
        if self._stopped:
            return "", True
        found = [(text.find(s, max(0, self._checked - len(s) + 1)), len(s)) for s in self._stops] if check else []
        cuts = [pos + size if self._include else pos for pos, size in found if pos >= 0]
        if cuts:
            cut = min(cuts)
            emit = text[self._emitted:cut]
            self.text, self._emitted, self._stopped = text[:cut], max(cut, self._emitted), True
            return emit, True
        held = next((n for n in range(min(self._max_hold, len(text) - self._emitted), 0, -1)
                     if any(s.startswith(text[-n:]) for s in self._stops)), 0)
        emit = text[self._emitted:len(text) - held]
        self.text, self._emitted, self._checked = text, max(len(text) - held, self._emitted), len(text)
        return emit, False

    def flush(self):
        emit = "" if self._stopped else self.text[self._emitted:]
        self._emitted = len(self.text)
        return emit


def test_extend_matches_the_full_text_checker():
    """Random pieces over a small alphabet (so stops overlap, repeat and span pieces), random stops."""
    for seed in range(500):
        rng = random.Random(seed)
        stops = tuple({"".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))})
        include, min_tokens = rng.random() < 0.3, rng.choice([0, 0, 2, 5])
        pieces = ["".join(rng.choices("abcd", k=rng.randint(0, 5))) for _ in range(rng.randint(1, 12))]
        new, old, text = StopChecker(stops, include_in_output=include), FullTextChecker(stops, include), ""
        case = (seed, stops, include, min_tokens, pieces)
        for count, piece in enumerate(pieces, start=1):
            text += piece
            got = new.extend(piece, check=count > min_tokens)
            assert got == old.feed(text, check=count > min_tokens), case
            if got[1]:
                break
        assert (new.flush(), new.text, new.stopped) == (old.flush(), old.text, old._stopped), case
        assert len(new._tail) <= max(map(len, stops)) - 1  # the window a stop may span, not the whole text
