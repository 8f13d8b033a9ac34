"""Structured outputs through the real engine (xgrammar) on a tiny random model: a random model left to itself
writes nothing valid, so every valid output here is the grammar's doing."""
import json

import jsonschema
import pytest

from converter.convert import ConvertOptions, convert
from formats.errors import TpDeployError
from runtime.api import LLM
from runtime.engine.grammar import StructuredOutputs
from runtime.engine.sampling import SamplingParams

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 9},
    "rain": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["city", "days", "rain", "tags"], "additionalProperties": False}
PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("structured")
    src = make_tiny(root / "src", "llama", vocab=301, seed=3)
    convert(ConvertOptions(src, root / "ws", 1))
    with LLM(root / "ws", device="cpu") as llm:
        yield llm


def test_json_schema_greedy_and_sampled_outputs_validate(llm):
    params = [SamplingParams(temperature=0, max_tokens=200, guided_json=SCHEMA)]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=200, guided_json=SCHEMA) for s in range(5)]
    outs = [llm.generate(PROMPT, p)[0].outputs[0] for p in params]
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 1  # sampling still samples, within the grammar


def test_choice_regex_grammar_and_json_object(llm):
    cases = [(SamplingParams(temperature=0, max_tokens=20, guided_choice=["yes", "no", "maybe"]),
              lambda t: t in ("yes", "no", "maybe")),
             (SamplingParams(temperature=0.7, seed=1, max_tokens=20, guided_regex=r"[0-9]{3}-[a-c]{2}"),
              lambda t: len(t) == 6 and t[:3].isdigit() and t[3] == "-" and set(t[4:]) <= set("abc")),
             (SamplingParams(temperature=0, max_tokens=20, guided_grammar='root ::= "x" ("y" | "z") "!"'),
              lambda t: t in ("xy!", "xz!")),
             (SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputs(json_object=True)),
              lambda t: isinstance(json.loads(t), dict))]
    for params, ok in cases:
        out = llm.generate(PROMPT, params)[0].outputs[0]
        assert out.finish_reason == "stop" and ok(out.text), (params.structured_outputs, out.text)


def test_unconstrained_requests_in_the_same_batch_are_untouched(llm):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPT], plain)[0].outputs[0].token_ids
    both = llm.generate([PROMPT, PROMPT], [plain, SamplingParams(temperature=0, max_tokens=12, guided_regex="[ab]+")])
    assert both[0].outputs[0].token_ids == alone and set(both[1].outputs[0].text) <= {"a", "b"}


@pytest.mark.parametrize("params, message", [
    (dict(guided_json={"type": "object", "properties": {"x": {"type": "nonsense"}}}), "JSON schema cannot be compiled"),
    (dict(guided_regex="(unclosed"), "regular expression cannot be compiled"),
    (dict(guided_grammar="root ::= missing_rule"), "grammar cannot be compiled"),
    (dict(guided_regex="a", guided_choice=["b"]), "give one output constraint"),
])
def test_invalid_constraints_are_refused_before_running(llm, params, message):
    with pytest.raises(TpDeployError, match=message):
        llm.generate(PROMPT, SamplingParams(max_tokens=5, **params))
