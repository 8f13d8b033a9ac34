"""Structured outputs, tool calls and the Responses API through a real `tprun serve` of SmolLM2, driven by the
official openai client; and tool_choice auto on a tiny model whose chat template has Hermes-style tool calls."""
import concurrent.futures
import json

import httpx
import jsonschema
import openai
import pytest

from converter.convert import ConvertOptions, convert
from tests.e2e.server import Server

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "languages": {"type": "array", "items": {"type": "string", "enum": ["en", "fr", "de"]}, "maxItems": 3}},
    "required": ["name", "age", "address", "languages"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 30},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                         "parameters": {"type": "object", "properties": {
                                             "tz": {"type": "string", "maxLength": 30}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def server(smollm2_ws):
    srv = Server(smollm2_ws[1])
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def test_twenty_json_schema_requests_parse_and_validate(client):
    def one(i: int) -> str:
        sampled = {"temperature": 0.9, "seed": i} if i % 2 else {"temperature": 0}
        r = client.chat.completions.create(
            model="smollm2", max_tokens=150, messages=[{"role": "user", "content": f"Invent person number {i}."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}, **sampled)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        texts = list(pool.map(one, range(20)))
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 2


def test_choice_regex_and_json_object(client):
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Is Paris in France?"}],
                                       max_tokens=5, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model="smollm2", prompt="My phone number is", max_tokens=20, temperature=0.8,
                                  seed=3, extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"})
    text = r.choices[0].text
    assert len(text) == 14 and text[0] == "(" and text[4:6] == ") " and text[9] == "-"
    r = client.chat.completions.create(model="smollm2", max_tokens=120, temperature=0,
                                       messages=[{"role": "user", "content": "Reply with a JSON object: {\"ok\": true}"}],
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content  # any JSON object: it may outgrow max_tokens, but never leaves JSON
    assert isinstance(json.loads(text), dict) if r.choices[0].finish_reason == "stop" else text.lstrip().startswith("{")


def test_required_and_named_tool_calls_validate(client):
    r = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=80, temperature=0,
                                       tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        r = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=60, temperature=0,
                                           tools=[WEATHER, TIME], tool_choice=named, stream=stream)
        if stream:
            deltas = [c.choices[0] for c in r if c.choices]
            calls = [t for d in deltas for t in (d.delta.tool_calls or [])]
            assert deltas[-1].finish_reason == "tool_calls" and len(calls) == 1
            name, args = calls[0].function.name, calls[0].function.arguments
        else:
            name, args = r.choices[0].message.tool_calls[0].function.name, r.choices[0].message.tool_calls[0].function.arguments
        assert name == "get_weather"
        jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_responses_api_text_function_call_and_stream(client):
    resp = client.responses.create(model="smollm2", input="Say hello in French.", instructions="Be brief.",
                                   max_output_tokens=40, temperature=0)
    assert resp.output_text and resp.usage.output_tokens > 0 and resp.status in ("completed", "incomplete")
    flat = {"type": "function", **WEATHER["function"]}
    resp = client.responses.create(model="smollm2", input="Weather in Rome?", tools=[flat], tool_choice="required",
                                   max_output_tokens=60, temperature=0)
    (call,) = [o for o in resp.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    with client.responses.stream(model="smollm2", input="Say yes.", max_output_tokens=60, temperature=0,
                                 text={"format": {"type": "json_schema", "name": "a",
                                                  "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                             "required": ["ok"]}}}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    assert isinstance(json.loads(final.output_text)["ok"], bool)


def test_bad_schemas_unknown_tools_and_stored_responses_are_400(client, server):
    with pytest.raises(openai.BadRequestError, match="JSON schema cannot be compiled"):
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "no-such-type"}}}}})
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=5, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "launch"}})
    with pytest.raises(openai.BadRequestError, match="previous_response_id is not supported"):
        client.responses.create(model="smollm2", input="hi", previous_response_id="resp_123")
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] > 0
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello world"
    assert httpx.get(f"{server.url}/version").json()["version"]


HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions.\n<tools>\n{%- for t in tools %}{{ t | tojson }}\n"
    "{%- endfor %}</tools>\nAnswer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n"
    "{%- endif %}{%- for m in messages %}{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{%- elif m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n{%- else %}<|im_start|>"
    "{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
FORCED = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "celsius"\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def hermes(tmp_path_factory):
    """A tiny random Qwen2 whose chat template writes Hermes-style <tool_call> blocks."""
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("hermes")
    src = make_tiny(root / "src", "qwen2", vocab=301, seed=2)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": HERMES_TEMPLATE}))
    convert(ConvertOptions(src, root / "ws", 1))
    srv = Server(root / "ws")
    yield srv, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)
    srv.close()


def test_auto_tool_choice_parses_hermes_calls_streaming_and_not(hermes):
    server, client = hermes
    # A random model writes no tool call by itself: a regex makes it write one, the parser must find it.
    kw = {"model": "smollm2", "messages": ASK, "tools": [WEATHER], "max_tokens": 300, "temperature": 0,
          "extra_body": {"guided_regex": FORCED}}
    r = client.chat.completions.create(**kw)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] == "celsius"
    chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    calls = [t for c in chunks for t in (c.delta.tool_calls or [])]
    assert "".join(c.delta.content or "" for c in chunks) == "" and chunks[-1].finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == \
        [("get_weather", json.loads(call.function.arguments))]
    # The call and its result go back through the template: the tool's answer is in the prompt.
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": turn, "tools": [WEATHER]}).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": prompt}).json()["prompt"]
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in text and '"arguments": {"city": ' in text
    r = client.chat.completions.create(model="smollm2", messages=turn, tools=[WEATHER], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    # The same round trip as Responses API items, and a function call parsed out of a Responses output.
    resp = client.responses.create(model="smollm2", max_output_tokens=5, temperature=0, input=[
        {"role": "user", "content": ASK[0]["content"]},
        {"type": "function_call", "call_id": call.id, "name": "get_weather", "arguments": call.function.arguments},
        {"type": "function_call_output", "call_id": call.id, "output": "sunny, 24 C"}],
        tools=[{"type": "function", **WEATHER["function"]}])
    assert resp.usage.input_tokens == len(prompt)  # the same prompt as the chat turn above
    resp = client.responses.create(model="smollm2", input=ASK[0]["content"], tools=[{"type": "function", **WEATHER["function"]}],
                                   max_output_tokens=300, temperature=0, extra_body={"guided_regex": FORCED})
    assert [(o.type, o.name) for o in resp.output] == [("function_call", "get_weather")]
