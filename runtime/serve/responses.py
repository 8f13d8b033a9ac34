"""``POST /v1/responses``: OpenAI's Responses API over the same engine path as chat completions.

A request is translated into a chat request (input items -> messages, flat function tools -> chat tools,
``text.format`` -> ``response_format``, ``max_output_tokens`` -> ``max_tokens``), generated like one, and
rendered as a Response: a ``message`` output item with ``output_text``, and a ``function_call`` item per
tool call. Streaming sends the typed events the official client reads (``response.created``,
``response.output_item.added``, ``response.output_text.delta``, ... ``response.completed``). The server
keeps no conversation state: ``previous_response_id`` is refused (send the whole input instead).
"""
from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool

from runtime.serve.contract import Delta, Usage
from runtime.serve.protocol import APIError, ChatCompletionRequest
from runtime.serve.render import Renderer
from runtime.serve.tools import ToolPlan, ToolStream, parse_output

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: Any
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: StrictBool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = True
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    seed: int | None = None  # not OpenAI's, but what vLLM users send
    guided_json: Any = None  # vLLM's structured-output extras, as on chat completions
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    def to_chat(self) -> ChatCompletionRequest:
        if self.previous_response_id:
            raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                                "whole conversation as input", param="previous_response_id")
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + _messages(self.input)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_output_tokens,
                                "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
                                "seed": self.seed, "parallel_tool_calls": self.parallel_tool_calls,
                                "stream_options": {"include_usage": True} if self.stream else None,
                                **{f"guided_{k}": getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")}}
        if self.tools is not None:
            body["tools"] = [_chat_tool(t, i) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            body["response_format"] = _response_format(fmt)
        try:
            return ChatCompletionRequest(**{k: v for k, v in body.items() if v is not None})
        except ValueError as e:
            raise APIError(400, f"input: {e}", param="input") from e


def _messages(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise APIError(400, "input must be a string or a non-empty list of items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and "role" in item:
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"), i)})
        else:
            raise APIError(400, f"input[{i}] is {kind!r}; this server reads message, function_call and "
                                "function_call_output items", param=f"input[{i}]")
    return out


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content):
        return "".join(p.get("text", "") for p in content)
    raise APIError(400, f"input[{i}] content must be text or input_text/output_text parts; this server takes text "
                        "only", param=f"input[{i}]")


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or "name" not in tool:
        raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"name\": ..., \"parameters\": {{...}}}}; "
                            "built-in tools (web search, files...) are not available here", param=f"tools[{i}]")
    fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(fmt: Any) -> dict[str, Any]:
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    return fmt


class ResponsesRenderer(Renderer):
    """Deltas of one request as a Response object, or as the Responses API's stream of typed events."""

    def __init__(self, *args: Any, tools: ToolPlan | None = None, request: ResponsesRequest | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id = "resp_" + self.id.split("-", 1)[-1]
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self._request = request
        self._seq = 0
        self._msg_id = f"msg_{uuid.uuid4().hex}"
        self._text: list[str] = []
        self._opened = False  # the message item was announced
        self._stream = ToolStream(self.tools) if self.tools is not None else None
        self._finish: str | None = None
        self._calls: list[dict[str, Any]] = []

    # -- whole response ---------------------------------------------------------------------------------
    def response(self, deltas: list[Delta], n: int, usage: Usage, prefixes: list[str] | None = None) -> dict:
        text = "".join(d.text for d in deltas)
        finish = next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None)
        content, calls = parse_output(self.tools, text) if self.tools is not None else (text, [])
        output = ([_message_item(self._msg_id, content)] if content or not calls else []) + [_call_item(c) for c in calls]
        return self._body(output, usage, finish)

    def _body(self, output: list[dict], usage: Usage | None, finish: str | None, status: str | None = None) -> dict:
        req = self._request
        done = status or ("incomplete" if finish == "length" else "completed")
        return {"id": self.id, "object": "response", "created_at": self.created, "status": done,
                "model": self.model, "output": output, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if done == "incomplete" else None,
                "instructions": req.instructions if req else None, "metadata": {},
                "parallel_tool_calls": req.parallel_tool_calls is not False if req else True,
                "temperature": req.temperature if req else None, "top_p": req.top_p if req else None,
                "tool_choice": (req.tool_choice or "auto") if req else "auto",
                "tools": (req.tools or []) if req else [], "text": (req.text or {"format": {"type": "text"}}) if req
                else {"format": {"type": "text"}},
                "usage": None if usage is None else _usage(usage)}

    # -- streaming --------------------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}

    def opening_chunks(self, n: int, prefixes: list[str] | None = None) -> list[dict[str, Any]]:
        body = self._body([], None, None, status="in_progress")
        return [self._event("response.created", response=body), self._event("response.in_progress", response=body)]

    def _open_message(self) -> list[dict[str, Any]]:
        self._opened = True
        return [self._event("response.output_item.added", output_index=0,
                            item={**_message_item(self._msg_id, ""), "status": "in_progress", "content": []}),
                self._event("response.content_part.added", item_id=self._msg_id, output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})]

    def delta_chunks(self, delta: Delta) -> list[dict[str, Any]]:
        text = self._stream.feed(delta.text) if self._stream is not None else delta.text
        out = self._text_events(text)
        if delta.finish_reason is not None:
            self._finish = delta.finish_reason
            if self._stream is not None:
                rest, self._calls = self._stream.finish()
                out += self._text_events(rest)
            out += self._close_message() + self._call_events()
        return out

    def _text_events(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        out = [] if self._opened else self._open_message()
        self._text.append(text)
        return out + [self._event("response.output_text.delta", item_id=self._msg_id, output_index=0,
                                  content_index=0, delta=text, logprobs=[])]

    def _close_message(self) -> list[dict[str, Any]]:
        if not self._opened and self._calls:
            return []  # only calls: no message item
        out = [] if self._opened else self._open_message()
        text = "".join(self._text)
        part = {"type": "output_text", "text": text, "annotations": []}
        return out + [self._event("response.output_text.done", item_id=self._msg_id, output_index=0, content_index=0,
                                  text=text, logprobs=[]),
                      self._event("response.content_part.done", item_id=self._msg_id, output_index=0,
                                  content_index=0, part=part),
                      self._event("response.output_item.done", output_index=0, item=_message_item(self._msg_id, text))]

    def _call_events(self) -> list[dict[str, Any]]:
        out, first = [], 1 if self._opened else 0
        for k, c in enumerate(self._calls):
            item, index = _call_item(c), first + k
            out += [self._event("response.output_item.added", output_index=index,
                                item={**item, "arguments": "", "status": "in_progress"}),
                    self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=item["arguments"]),
                    self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                arguments=item["arguments"], name=item["name"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
        return out

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        text = "".join(self._text)
        output = ([_message_item(self._msg_id, text)] if self._opened else []) + [_call_item(c) for c in self._calls]
        body = self._body(output, usage, self._finish)
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        return self._event(kind, response=body)

    def finish_chunk(self, index: int, reason: str) -> dict[str, Any]:
        return self._event("response.failed", response=self._body([], None, reason, status="failed"))


def _message_item(item_id: str, text: str | None) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text or "", "annotations": []}]}


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call['id'].removeprefix('call_')}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


def _usage(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}
