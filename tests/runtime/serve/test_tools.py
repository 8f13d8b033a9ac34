"""Tool-call parsing, tool_choice planning and the structured-output fields of requests (no model)."""
from __future__ import annotations

import json

import pytest

from runtime.engine.grammar import StructuredOutputs
from runtime.serve.protocol import APIError
from runtime.serve.tools import (
    ToolStream,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
    parse_output,
    parser_for_template,
    plan_tools,
    template_messages,
)
from tests.runtime.serve.test_app import error_of, only_request
from tests.runtime.serve.conftest import KEY

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
HELLO = [{"role": "user", "content": "hello"}]


def _args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_blocks_with_content_an_unclosed_last_block_and_malformed_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}')
    content, calls = parse_hermes(text)
    assert content == "Let me check." and _args(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert parse_hermes("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert parse_hermes("no tools here") == ("no tools here", [])


def test_llama3_and_mistral_formats():
    content, calls = parse_llama3_json('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert content is None and _args(calls) == [("get_weather", {"city": "Rome"})]
    assert parse_llama3_json("The answer is 4.") == ("The answer is 4.", [])
    content, calls = parse_mistral('[TOOL_CALLS][{"name": "get_time", "arguments": {}}]')
    assert content is None and _args(calls) == [("get_time", {})]


def test_parser_is_picked_from_the_chat_template():
    assert parser_for_template("{% if tools %}<tool_call>{{ tools }}</tool_call>{% endif %}") == "hermes"
    assert parser_for_template("[AVAILABLE_TOOLS]...[TOOL_CALLS]") == "mistral"
    assert parser_for_template("<|python_tag|>") == "llama3_json"
    assert parser_for_template("{{ messages }}") == "none"


def test_tool_choice_plans_and_their_errors():
    plan = plan_tools([WEATHER, TIME], "required", True, "none")
    assert plan.mode == "required" and plan.constraint.json and plan.template_tools[0] == WEATHER
    schema = json.loads(plan.constraint.json)
    assert schema["minItems"] == 1 and "maxItems" not in schema and len(schema["items"]["anyOf"]) == 2
    assert json.loads(plan_tools([WEATHER], "required", False, "none").constraint.json)["maxItems"] == 1
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, True, "hermes")
    assert named.mode == "named" and json.loads(named.constraint.json) == WEATHER["function"]["parameters"]
    assert plan_tools([WEATHER], None, True, "hermes").mode == "parse"
    assert plan_tools([WEATHER], "none", True, "hermes").constraint is None
    assert plan_tools(None, None, True, "hermes") is None
    for tools, choice, parser, message in [
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "hermes", "not among the tools"),
        ([WEATHER], "auto", "none", "needs a tool-call parser"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "hermes", "letters, digits"),
        ([WEATHER, WEATHER], "auto", "hermes", "same function twice"),
        (None, "required", "hermes", "needs tools"),
        ([WEATHER], "always", "hermes", "tool_choice must be"),
    ]:
        with pytest.raises(APIError, match=message):
            plan_tools(tools, choice, True, parser)


def test_forced_outputs_parse_into_calls():
    plan = plan_tools([WEATHER, TIME], "required", True, "none")
    content, calls = parse_output(plan, '[{"name": "get_time", "parameters": {}}]')
    assert content is None and _args(calls) == [("get_time", {})]
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, True, "none")
    assert _args(parse_output(named, '{"city": "Oslo"}')[1]) == [("get_weather", {"city": "Oslo"})]


def test_tool_stream_sends_content_and_holds_back_a_possible_call():
    stream = ToolStream(plan_tools([WEATHER], "auto", True, "hermes"))
    sent = [stream.feed(t) for t in ["Sure", ". <to", "ol_call>\n{\"name\": \"get_weather\", ",
                                     "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"]]
    assert "".join(sent) == "Sure. " and sent[1] == ". "  # "<to" held until it cannot be the marker
    rest, calls = stream.finish()
    assert rest == "" and _args(calls) == [("get_weather", {"city": "Paris"})]
    plain = ToolStream(plan_tools([WEATHER], "auto", True, "hermes"))
    assert plain.feed("a <") == "a " and plain.feed(" b") == "< b" and plain.finish() == ("", [])


def test_tool_call_arguments_become_objects_for_the_template():
    msgs = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = template_messages(msgs)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and out[1] == msgs[1]


@pytest.mark.parametrize("extra, expected", [
    ({"response_format": {"type": "json_object"}}, StructuredOutputs(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     StructuredOutputs(json={"type": "object"})),
    ({"guided_choice": ["yes", "no"]}, StructuredOutputs(choice=("yes", "no"))),
    ({"guided_regex": "[0-9]+"}, StructuredOutputs(regex="[0-9]+")),
    ({"structured_outputs": {"grammar": "root ::= \"a\""}}, StructuredOutputs(grammar="root ::= \"a\"")),
    ({"response_format": {"type": "text"}}, None),
])
def test_structured_output_fields_reach_the_engine(client, engine, extra, expected):
    client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=3, extra_body=extra)
    assert only_request(engine)[1].structured_outputs == expected


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "type must be"),
    ({"guided_choice": []}, "non-empty list"),
    ({"guided_json": "{nope"}, "not valid JSON"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "give one"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "cannot be combined"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "not among the tools"),
    ({"tools": [WEATHER]}, "needs a tool-call parser"),  # the fake template shows no tool-call format
])
def test_bad_constraints_are_400(http, body, message):
    r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                  json={"model": "tiny-chat", "messages": HELLO, **body})
    assert message in error_of(r, 400)["message"]


def test_forced_tool_call_is_rendered_as_tool_calls(client, engine):
    """tool_choice required over the fake engine: the constraint reaches the engine, the tools the template."""
    client.chat.completions.create(model="tiny-chat", messages=HELLO, tools=[WEATHER], tool_choice="required",
                                   max_tokens=3)
    prompt, params = only_request(engine)
    assert json.loads(params.structured_outputs.json)["items"]["properties"]["name"] == {"const": "get_weather"}
    assert engine.tokenizer.decode(prompt).startswith("<tools>")


REASONED = ["<think>\nLet me see. 2+2</think>\n\nThe answer is 4.", "Plain answer.", "thought first</think>\nanswer",
            "<think>unfinished thought", "<th", "\n<think>a</think>b</think>c", "</think>only content"]


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_reasoning_streamed_in_any_pieces_equals_the_whole_split(parser):
    import random

    from runtime.serve.reasoning import ReasoningStream, split

    for text in REASONED:
        expected = split(parser, text)
        for seed in range(30):
            rng = random.Random(seed)
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6))))
            stream, got = ReasoningStream(parser), ["", ""]
            for piece in [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] + [None]:
                r, c = stream.finish() if piece is None else stream.feed(piece)
                got = [got[0] + r, got[1] + c]
            assert got == [expected[0] or "", expected[1]], (parser, text, cuts)
    assert split("qwen3", REASONED[0]) == ("\nLet me see. 2+2", "The answer is 4.")
    assert split("qwen3", "Plain answer.") == (None, "Plain answer.")  # thinking off
    assert split("deepseek_r1", "thought first</think>\nanswer") == ("thought first", "answer")
    assert split("deepseek_r1", "still thinking") == ("still thinking", "")


def test_chat_renderer_splits_reasoning_from_content_and_tool_calls():
    from runtime.serve.contract import Delta, Usage
    from runtime.serve.render import ChatRenderer
    from tests.runtime.serve.fake_engine import FakeTokenizer

    text = '<think>need weather</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    plan = plan_tools([WEATHER], "auto", True, "hermes")
    whole = ChatRenderer("r", 0, "m", FakeTokenizer(), False, False, tools=plan, reasoning="qwen3").response(
        [Delta("r", 0, text, [1], finish_reason="stop")], 1, Usage(1, 1))
    msg = whole["choices"][0]["message"]
    assert msg["reasoning_content"] == "need weather" and msg["content"] is None
    assert _args(msg["tool_calls"]) == [("get_weather", {"city": "Rome"})] and whole["choices"][0]["finish_reason"] == "tool_calls"
    renderer = ChatRenderer("r", 0, "m", FakeTokenizer(), False, False, tools=plan, reasoning="qwen3")
    chunks = [c for i in range(0, len(text), 7) for c in renderer.delta_chunks(
        Delta("r", 0, text[i:i + 7], [1], finish_reason="stop" if i + 7 >= len(text) else None))]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "need weather"
    assert "".join(d.get("content", "") or "" for d in deltas).strip() == ""
    assert [t["function"]["name"] for d in deltas for t in d.get("tool_calls", [])] == ["get_weather"]
