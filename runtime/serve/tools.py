"""Tool calling: the request's tools into the chat template, the model's output into ``tool_calls``.

``tool_choice`` decides how (OpenAI's semantics):

* ``auto`` (the default with tools): the template shows the tools, the model decides, and the output is
  parsed by the model family's parser (``--tool-call-parser``; ``auto`` picks it from the chat template);
* ``required`` and a named function: the output is constrained by a JSON schema (structured outputs),
  so the calls always parse and their arguments always validate — a JSON array of ``{"name",
  "parameters"}`` objects for ``required`` (one at most without ``parallel_tool_calls``), the arguments
  object itself for a named function, as vLLM does;
* ``none``: the tools are shown but the output is plain content.

Parsers (each returns the content before the calls and the calls; text that does not parse stays content):

* ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen2.5, Qwen3, Hermes);
* ``llama3_json``: the whole output is ``{"name": ..., "parameters": {...}}`` (several joined by ``;``),
  optionally after ``<|python_tag|>``;
* ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}``.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from runtime.engine.grammar import StructuredOutputs
from runtime.serve.protocol import APIError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
HERMES_OPEN = "<tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]
    spec: dict[str, Any]  # as the chat template receives it: {"type": "function", "function": {...}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools and tool_choice ask of the prompt, the sampler and the output."""

    template_tools: list[dict[str, Any]] | None  # passed to the chat template
    constraint: StructuredOutputs | None  # required / named: the output's schema
    mode: str  # "parse" (auto), "required", "named", or "none" (no tool calls expected)
    parser: str = "none"
    named: str | None = None


def parse_tools(tools: Any) -> list[Tool]:
    if not isinstance(tools, list) or not tools:
        raise APIError(400, "tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}",
                       param="tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                "\"parameters\": {...}}}} with a name of letters, digits, _ or - (at most 64)",
                           param=f"tools[{i}]")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param=f"tools[{i}]")
        out.append(Tool(fn["name"], params, {"type": "function", "function": {**fn, "parameters": params}}))
    if len({t.name for t in out}) != len(out):
        raise APIError(400, "tools name the same function twice; give each function once", param="tools")
    return out


def plan_tools(tools: Any, tool_choice: Any, parallel: bool, parser: str) -> ToolPlan | None:
    """None without tools; else how this request handles them (APIError 400 for a bad choice)."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise APIError(400, f"tool_choice={tool_choice!r:.80} needs tools", param="tool_choice")
        return None
    specs = parse_tools(tools)
    shown = [t.spec for t in specs]
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(shown, None, "none")
    if choice == "auto":
        if parser == "none":
            raise APIError(400, "tool_choice auto needs a tool-call parser, and this server has none for its model "
                                "(start it with --tool-call-parser hermes|llama3_json|mistral), or use "
                                "tool_choice required or a named function", param="tool_choice")
        return ToolPlan(shown, None, "parse", parser)
    if choice == "required":
        return ToolPlan(shown, StructuredOutputs(json=_calls_schema(specs, parallel)), "required")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        else None
    if not isinstance(name, str):
        raise APIError(400, f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ...}}}}, got {tool_choice!r:.80}", param="tool_choice")
    match = [t for t in specs if t.name == name]
    if not match:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                            f"({', '.join(t.name for t in specs)})", param="tool_choice")
    return ToolPlan(shown, StructuredOutputs(json=match[0].parameters), "named", named=name)


def _calls_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    one = [{"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.parameters},
            "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": one[0] if len(one) == 1 else {"anyOf": one}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parser_for_template(template: Any) -> str:
    """The parser a chat template's tool-call format needs (``--tool-call-parser auto``), or "none"."""
    text = json.dumps(template) if not isinstance(template, str) else template
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or "ipython" in text:
        return "llama3_json"
    return "none"


def call(name: str, arguments: Any) -> dict[str, Any]:
    """One ``tool_calls`` entry; arguments as a JSON string, as OpenAI sends them."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def parse_output(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a finished output."""
    if plan.mode == "named":
        return None, [call(plan.named, _compact(text))]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text, []  # cut by max_tokens: no call to report
        return None, [call(i["name"], i["parameters"]) for i in items]
    if plan.mode == "parse":
        return PARSE[plan.parser](text)
    return text, []


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text


def _json_call(obj: Any, args_key: str) -> dict[str, Any] | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get(args_key, {}), dict):
        return call(obj["name"], obj.get(args_key, {}))
    return None


def parse_hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    calls = []
    bodies = _HERMES.findall(text)
    tail = text[text.rfind("</tool_call>") + 1:] if bodies else text
    if HERMES_OPEN in tail:  # the last block, when the model stopped before closing it
        bodies.append(tail[tail.index(HERMES_OPEN) + len(HERMES_OPEN):].strip())
    for body in bodies:
        try:
            c = _json_call(json.loads(body), "arguments")
        except ValueError:
            c = None
        if c is None:
            return text, []  # a malformed block: the model's text, unchanged
        calls.append(c)
    if not calls:
        return text, []
    content = text[:text.index(HERMES_OPEN)].strip()
    return content or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in body.split(";"):
        try:
            c = _json_call(json.loads(part), "parameters" if "parameters" in part else "arguments")
        except ValueError:
            return text, []
        if c is None:
            return text, []
        calls.append(c)
    return None, calls


def parse_mistral(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    if "[TOOL_CALLS]" not in text:
        return text, []
    content, _, body = text.partition("[TOOL_CALLS]")
    try:
        items = json.loads(body.strip())
    except ValueError:
        return text, []
    calls = [_json_call(i, "arguments") for i in (items if isinstance(items, list) else [items])]
    if not calls or any(c is None for c in calls):
        return text, []
    return content.strip() or None, calls


PARSE = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral,
         "none": lambda text: (text, [])}
MARKERS = {"hermes": HERMES_OPEN, "mistral": "[TOOL_CALLS]", "llama3_json": "{"}


@dataclass
class ToolStream:
    """Streams content until a tool call may begin, then holds the rest back and reports the calls when
    the output ends (each call in one delta, with its whole arguments: clients concatenate deltas)."""

    plan: ToolPlan
    _text: str = ""  # everything so far
    _sent: int = 0  # characters of _text already sent as content

    def feed(self, text: str) -> str:
        """New content to send now."""
        self._text += text
        if self.plan.mode in ("named", "required"):
            return ""  # the whole output is the calls
        if self.plan.mode != "parse":
            out, self._sent = self._text[self._sent:], len(self._text)
            return out
        marker = MARKERS[self.plan.parser]
        if self.plan.parser == "llama3_json":
            start = 0 if self._text.lstrip().startswith(("{", "<|python_tag|>")) or not self._text.strip() \
                else len(self._text)
        else:
            start = self._text.find(marker)
            if start < 0:  # hold back a tail that could still become the marker
                start = len(self._text) - partial_suffix(self._text, marker)
        out, self._sent = self._text[self._sent:max(start, self._sent)], max(start, self._sent)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Content still held back, and the calls, once the output has ended (the content before the calls
        was sent already: it ends where the calls begin)."""
        _, calls = parse_output(self.plan, self._text)
        return ("", calls) if calls else (self._text[self._sent:], [])


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates read them: an assistant's ``tool_calls[].function.arguments``
    is a JSON string in OpenAI's API but an object in the templates (they ``tojson`` it)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    except ValueError:
                        pass
                    c = {**c, "function": fn}
                fixed.append(c)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
