"""Structured outputs: each step, a token mask from the request's grammar, applied before sampling.

A request asks for one constraint (``StructuredOutputs``): a JSON schema, any JSON object, a regular
expression, one of a few strings, or an EBNF grammar. ``Grammars`` compiles each distinct constraint
once (xgrammar's compiler, cached by its canonical text), gives every sample its own matcher, and on
rank 0, where sampling happens, fills one bitmask row per constrained sample and sets the forbidden
logits to -inf; requests without a constraint cost nothing (no mask, no copy). When the grammar is
complete only EOS stays allowed, so a constrained sample ends with ``finish_reason`` "stop".

xgrammar is imported on the first constrained request only: it imports part of transformers for its
Hugging Face helpers, which the runtime otherwise never loads (~1.6 s, once per server).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from formats.errors import TpDeployError

CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on a request's output (vLLM's ``StructuredOutputsParams``): set exactly one field."""

    json: Any = None  # a JSON schema: a dict, or its JSON text
    json_object: bool = False  # any JSON object (OpenAI's response_format {"type": "json_object"})
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF, in the GBNF dialect xgrammar reads

    def __post_init__(self) -> None:
        given = [f for f in ("json", "regex", "choice", "grammar") if getattr(self, f) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise TpDeployError(f"structured outputs take exactly one of json, json_object, regex, choice, grammar; "
                                f"got {given or 'none'}")
        if self.json is not None:
            object.__setattr__(self, "json", _schema_text(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", _choices(self.choice))
        for f in ("regex", "grammar"):
            value = getattr(self, f)
            if value is not None and (not isinstance(value, str) or not value):
                raise TpDeployError(f"guided_{f} must be a non-empty string, got {value!r:.80}")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): what is compiled, and the cache key."""
        if self.json is not None:
            return "json", self.json
        if self.json_object:
            return "json_object", ""
        if self.choice is not None:
            return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        return ("regex", self.regex) if self.regex is not None else ("grammar", self.grammar)


def _schema_text(schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise TpDeployError(f"guided_json is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise TpDeployError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return json.dumps(schema, ensure_ascii=False)  # key order kept: properties are generated in it


def _choices(choice: Any) -> tuple[str, ...]:
    if not isinstance(choice, (list, tuple)) or not choice or not all(isinstance(c, str) and c for c in choice):
        raise TpDeployError(f"guided_choice must be a non-empty list of non-empty strings, got {choice!r:.80}")
    if len(choice) > MAX_CHOICES:
        raise TpDeployError(f"guided_choice takes at most {MAX_CHOICES} strings, got {len(choice)}")
    return tuple(choice)


class Grammars:
    """Compiled constraints for one tokenizer and model vocabulary; thread-safe (requests are checked
    on the server's event loop, matchers are made and advanced on the engine thread)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, so: StructuredOutputs):
        """The compiled grammar of ``so``; raises TpDeployError naming what is wrong with it."""
        with self._lock:
            hit = self._cache.get(so.key)
            if hit is not None:
                self._cache.move_to_end(so.key)
                return hit
        compiled = self._compile(*so.key)
        with self._lock:
            self._cache[so.key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, so: StructuredOutputs) -> Matcher:
        import xgrammar

        return Matcher(xgrammar.GrammarMatcher(self.compile(so)))

    def constrain(self, logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> torch.Tensor:
        """``logits`` (B, V) float32 with every token a row's grammar forbids at -inf (a copy, or the input
        itself when no row has a grammar)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(len(matchers), logits.shape[-1])
        for i in rows:
            matchers[i].fill(bitmask, i)
        out = logits.clone()
        xgrammar.apply_token_bitmask_inplace(out, bitmask, vocab_size=logits.shape[-1], indices=rows)
        return out

    def _compile(self, kind: str, text: str):
        compiler = self._get_compiler()
        try:
            if kind == "json":
                return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
            if kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return compiler.compile_regex(text)
            return compiler.compile_grammar(text)
        except (RuntimeError, ValueError) as e:  # xgrammar's parse errors say where
            what = {"json": "JSON schema", "regex": "regular expression", "grammar": "grammar"}.get(kind, kind)
            raise TpDeployError(f"the {what} cannot be compiled: {str(e).strip()[:400]}") from e

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = tokenizer_info(xgrammar, self._tokenizer, self._vocab_size)
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # our cache is keyed by text
            return self._compiler


class Matcher:
    """One sample's position in its grammar."""

    def __init__(self, matcher: Any):
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False when the grammar does not allow it (it always does, as it
        was masked, unless a stop token the grammar does not know ended the sample)."""
        return self._m.accept_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return self._m.is_terminated()


def tokenizer_info(xgrammar: Any, tokenizer: Any, vocab_size: int):
    """xgrammar's view of the workspace tokenizer (tokenizer.json), without transformers' classes: the
    vocabulary by id over the model's vocab_size (ids no token has stay empty, so they are never
    allowed), the vocabulary's byte encoding as xgrammar detects it from tokenizer.json, and EOS."""
    backend = tokenizer.backend
    encoded: list[str] = [""] * vocab_size
    for token, idx in backend.get_vocab(with_added_tokens=True).items():
        if idx < vocab_size:
            encoded[idx] = token
    meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgrammar.TokenizerInfo(encoded, vocab_type=meta["vocab_type"], vocab_size=vocab_size,
                                  stop_token_ids=sorted(tokenizer.eos_token_ids),
                                  add_prefix_space=meta["add_prefix_space"])
