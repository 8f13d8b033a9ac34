"""OpenAI response and chunk objects built from engine Deltas (the requests are ``protocol``'s)."""
from __future__ import annotations

import json
import math
from typing import Any

from runtime.serve.contract import Delta, Usage
from runtime.serve.reasoning import ReasoningStream
from runtime.serve.reasoning import split as split_reasoning
from runtime.serve.tools import ToolPlan, ToolStream, parse_output

# JSON has no -inf; a token the model rules out gets vLLM's floor instead of breaking the response.
_LOGPROB_FLOOR = -9999.0


def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > _LOGPROB_FLOOR else _LOGPROB_FLOOR


class _Choice:
    """Everything one sample produced so far (non-streaming responses)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None


class Renderer:
    """Turns Deltas of one request into OpenAI response or chunk objects."""

    object_name = object_chunk = ""

    def __init__(self, response_id: str, created: int, model: str, tokenizer: Any,
                 logprobs: bool, include_usage: bool) -> None:
        self.id, self.created, self.model = response_id, created, model
        self._decode, self._tokens = tokenizer.decode, {}
        self.logprobs, self.include_usage = logprobs, include_usage

    def token_text(self, token_id: int) -> str:
        if token_id not in self._tokens:  # top-k lists repeat the same ids token after token
            self._tokens[token_id] = self._decode([token_id])
        return self._tokens[token_id]

    def _envelope(self, obj: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def chunk(self, choices: list[dict]) -> dict[str, Any]:
        body = self._envelope(self.object_chunk, choices)
        if self.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._envelope(self.object_chunk, []), "usage": usage_body(usage)}

    def response(self, deltas: list[Delta], n: int, usage: Usage,
                 prefixes: list[str] | None = None) -> dict[str, Any]:
        """The whole response; ``prefixes`` (echo) go before each choice's text."""
        choices = [_Choice() for _ in range(n)]
        for c, prefix in zip(choices, prefixes or []):
            c.text.append(prefix)
        for d in deltas:
            c = choices[d.index]
            c.text.append(d.text)
            c.logprobs.extend(d.logprobs)
            c.finish_reason = d.finish_reason or c.finish_reason
        body = self._envelope(self.object_name, [self._choice(i, c) for i, c in enumerate(choices)])
        return {**body, "usage": usage_body(usage)}

    def _choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    def opening_chunks(self, n: int, prefixes: list[str] | None = None) -> list[dict[str, Any]]:
        return [self.delta_chunks(Delta(self.id, i, p, []))[0] for i, p in enumerate(prefixes or []) if p]

    def finish_chunk(self, index: int, reason: str) -> dict[str, Any]:
        """A choice ended with ``reason`` and no new text (a stream cut by a server fault)."""
        raise NotImplementedError

    def delta_chunks(self, delta: Delta) -> list[dict[str, Any]]:
        raise NotImplementedError


class ChatRenderer(Renderer):
    object_name, object_chunk = "chat.completion", "chat.completion.chunk"

    def __init__(self, *args: Any, tools: ToolPlan | None = None, reasoning: str = "none", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.reasoning = reasoning
        self._streams: dict[int, ToolStream] = {}  # per choice, when streaming with tools
        self._thinking: dict[int, ReasoningStream] = {}  # per choice, when streaming with a reasoning parser

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    def _logprobs(self, entries: list) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [{**self._token(e.token_id, e.logprob),
                             "top_logprobs": [self._token(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def _choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        thought, text = split_reasoning(self.reasoning, "".join(choice.text))
        reason = choice.finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.tools is not None:
            content, calls = parse_output(self.tools, text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = "tool_calls" if reason == "stop" else reason
        if self.reasoning != "none":
            message["reasoning_content"] = thought
        return {"index": index, "message": message, "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": reason}

    def opening_chunks(self, n: int, prefixes: list[str] | None = None) -> list[dict[str, Any]]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}]) for i in range(n)]

    def finish_chunk(self, index: int, reason: str) -> dict[str, Any]:
        return self.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def delta_chunks(self, delta: Delta) -> list[dict[str, Any]]:
        out, reason, i = [], delta.finish_reason, delta.index
        thinking = self._thinking.setdefault(i, ReasoningStream(self.reasoning)) if self.reasoning != "none" else None
        thought, text = thinking.feed(delta.text) if thinking else ("", delta.text)
        if reason is not None and thinking is not None:
            more_thought, more_text = thinking.finish()
            thought, text = thought + more_thought, text + more_text
        stream = self._streams.setdefault(i, ToolStream(self.tools)) if self.tools is not None else None
        if stream is not None:
            text = stream.feed(text)
        if thought:
            out.append(self.chunk([{"index": i, "delta": {"reasoning_content": thought}, "logprobs": None,
                                    "finish_reason": None}]))
        if text or delta.logprobs:
            out.append(self.chunk([{"index": i, "delta": {"content": text},
                                    "logprobs": self._logprobs(delta.logprobs), "finish_reason": None}]))
        if reason is not None and stream is not None:
            rest, calls = stream.finish()
            if rest:
                out.append(self.chunk([{"index": i, "delta": {"content": rest}, "logprobs": None,
                                        "finish_reason": None}]))
            if calls:
                out.append(self.chunk([{"index": i, "delta": {"tool_calls": [
                    {"index": k, **c} for k, c in enumerate(calls)]}, "logprobs": None, "finish_reason": None}]))
                reason = "tool_calls" if reason == "stop" else reason
        if reason is not None:
            out.append(self.chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}]))
        return out


class CompletionRenderer(Renderer):
    object_name = object_chunk = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offsets: dict[int, int] = {}  # per choice: text_offset of its next token

    def _logprobs(self, index: int, entries: list) -> dict[str, Any] | None:
        """The legacy format; ``text_offset`` counts characters of the generated text."""
        if not self.logprobs:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        offset = self._offsets.get(index, 0)
        for e in entries:
            token = self.token_text(e.token_id)
            top = {self.token_text(t): _finite(lp) for t, lp in e.top}
            top.setdefault(token, _finite(e.logprob))  # OpenAI: the chosen token is always listed
            out["tokens"].append(token)
            out["token_logprobs"].append(_finite(e.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return out

    def _choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        return {"index": index, "text": "".join(choice.text),
                "logprobs": self._logprobs(index, choice.logprobs),
                "finish_reason": choice.finish_reason}

    def finish_chunk(self, index: int, reason: str) -> dict[str, Any]:
        return self.chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": reason}])

    def delta_chunks(self, delta: Delta) -> list[dict[str, Any]]:
        if not (delta.text or delta.logprobs or delta.finish_reason is not None):
            return []
        return [self.chunk([{"index": delta.index, "text": delta.text,
                             "logprobs": self._logprobs(delta.index, delta.logprobs),
                             "finish_reason": delta.finish_reason}])]
