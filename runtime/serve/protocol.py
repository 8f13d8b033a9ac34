"""OpenAI request models: what clients send, validated once, turned into the engine's SamplingParams.

Requests are validated by pydantic with OpenAI's field names; anything a client adds that we do not
know (``user``, ``metadata``...) is ignored, as OpenAI-compatible servers do. Fields that OpenAI
defines but this server cannot honour are accepted only at their neutral value, so that a client
never silently gets an answer to a different question than the one it asked.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from formats.errors import TpDeployError
from runtime.engine.grammar import StructuredOutputs
from runtime.engine.sampling import MAX_LOGPROBS, SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit; more would also slow the engine's per-token stop check
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's cap
MAX_PROMPTS = 64  # prompts in one /v1/completions request; each becomes its own engine request


class APIError(Exception):
    """An error the HTTP layer turns into OpenAI's ``{"error": {...}}`` body with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


def error_body(message: str, type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------- requests
def _is_neutral(value: Any) -> bool:
    """True when an unsupported OpenAI field holds a value that asks for nothing (0, false, {}...)."""
    if value is None or value is False or value in ("", {}, []):
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where a string holds a lone UTF-16 surrogate (JSON allows ``"\\udfff"``, UTF-8 does not), or None.

    Such a string cannot be tokenized nor written back as UTF-8, so it is refused at the door."""
    if isinstance(value, str):
        for i, ch in enumerate(value):
            if "\ud800" <= ch <= "\udfff":
                return f"{path or 'the request'} holds a lone UTF-16 surrogate ({ch!a}) at character {i}"
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, path) or _lone_surrogate(v, f"{path}.{k}".lstrip("."))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{path}[{i}]")
            if found:
                return found
    return None


# field -> what to do instead; checked by _SamplingRequest._reject_unsupported
_UNSUPPORTED = {
    "logit_bias": "remove it from the request",
    "best_of": "use n and rank the samples on the client",
    "suffix": "send the whole text as the prompt",
    "functions": "functions is OpenAI's deprecated spelling; send tools (and tool_choice) instead",
}


_STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def _response_format(value: Any) -> StructuredOutputs:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise TpDeployError("type json_schema needs json_schema.schema, a JSON schema object: "
                                '{"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}')
        return StructuredOutputs(json=schema)
    raise TpDeployError(f"type must be \"text\", \"json_object\" or \"json_schema\", got {value!r:.80}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = False


class _SamplingRequest(BaseModel):
    """Fields shared by chat and completions; ``None`` everywhere means "the default"."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # absent = the served model, as in vLLM
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None
    seed: int | None = None
    # Strict: "stream": "yes" is a mistake to report, not a truthy string to guess at.
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: StrictBool | None = True
    include_stop_str_in_output: StrictBool | None = None
    # OpenAI fields accepted only at neutral values (see _UNSUPPORTED)
    logit_bias: Any = None
    # structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs (one of them)
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        problem = _lone_surrogate(data)
        if problem:
            raise ValueError(f"{problem}; send valid Unicode text")
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"must be a string or a list of strings, got {value!r:.80}")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"takes at most {MAX_STOP_STRINGS} strings (as OpenAI), got {len(stops)}")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _reject_unsupported(self) -> None:
        for field, advice in _UNSUPPORTED.items():
            value = getattr(self, field, None)
            if field == "best_of" and value == (self.n or 1):
                continue  # best_of = n is plain sampling
            if not _is_neutral(value):
                raise APIError(400, f"{field}={value!r:.80} is not supported by this server; "
                                    f"{advice}", param=field)

    def structured(self) -> StructuredOutputs | None:
        """The one output constraint the request asks for, or None; APIError 400 naming the field."""
        given = {f: getattr(self, f) for f in ("response_format", "guided_json", "guided_regex", "guided_choice",
                                                 "guided_grammar", "structured_outputs")
                 if getattr(self, f) is not None}
        if given.get("response_format") in ({"type": "text"},):
            del given["response_format"]
        if not given:
            return None
        if len(given) > 1:
            raise APIError(400, f"{' and '.join(given)} each constrain the output; give one", param=list(given)[1])
        field, value = next(iter(given.items()))
        try:
            if field == "response_format":
                return _response_format(value)
            if field == "structured_outputs":
                if not isinstance(value, dict):
                    raise TpDeployError("structured_outputs must be an object, e.g. {\"json\": {...}}")
                return StructuredOutputs(**{k: v for k, v in value.items() if k in _STRUCTURED_KEYS})
            return StructuredOutputs(**{field.removeprefix("guided_"): value})
        except (TpDeployError, TypeError) as e:
            raise APIError(400, f"{field}: {e}", param=field) from e

    def _max_tokens(self) -> int | None:
        raise NotImplementedError

    def _logprobs(self) -> int | None:
        raise NotImplementedError

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters; raises APIError 400 naming the first bad field."""
        self._reject_unsupported()
        fields = dict(n=self.n, max_tokens=self._max_tokens(), temperature=self.temperature,
                      top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                      repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, min_tokens=self.min_tokens, seed=self.seed,
                      stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      logprobs=self._logprobs(), skip_special_tokens=self.skip_special_tokens,
                      structured_outputs=self.structured())
        # None (absent or JSON null) leaves SamplingParams' own default in place.
        given = {k: v for k, v in fields.items() if v is not None or k in ("max_tokens", "logprobs")}
        try:
            return SamplingParams(**given)
        except TpDeployError as e:  # its messages start with the field's name ("top_p must be...")
            field = str(e).split(" ", 1)[0]
            param = field if field in type(self).model_fields else None
            raise APIError(400, str(e), param=param) from e


class ChatMessage(BaseModel):
    """One turn; extra keys (``name``, ``tool_calls``...) go to the chat template unchanged."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be a string or a list of text parts, got {value!r:.80}")
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} is {kind!r}; this server takes text only: "
                                 '{"type": "text", "text": "..."}')
            texts.append(part["text"])
        return "\n".join(texts)  # vLLM's rendering of several text parts for string templates

    def for_template(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=False)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # absent = up to the context window
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: StrictBool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = True
    functions: Any = None
    # vLLM extension: kwargs for the chat template (e.g. {"enable_thinking": false} for Qwen3)
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM extensions: continue the last (assistant) message instead of opening a new turn
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    @model_validator(mode="after")
    def _turns(self) -> ChatCompletionRequest:
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError("continue_final_message continues the last message, so it needs "
                                 "add_generation_prompt: false (as in vLLM)")
            last = self.messages[-1]
            if last.role != "assistant" or not last.content:
                raise ValueError("continue_final_message needs the last message to be an assistant "
                                 f"message with text to continue; it is a {last.role!r} message")
        return self

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


def _one_prompt(value: Any, where: str) -> str | list[int]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return value
    raise ValueError(f"{where}must be a string or a non-empty list of token ids (ints >= 0), "
                     f"got {value!r:.80}")


class CompletionRequest(_SamplingRequest):
    # required: a string, a list of token ids, or a list of either (one set of choices per prompt)
    prompt: Any = Field()
    max_tokens: int | None = 16  # the legacy API's default; null = up to the context window
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: StrictBool | None = False
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        """Always a list of prompts: OpenAI fans a list out into choices, ``n`` per prompt."""
        if isinstance(value, list) and value and any(isinstance(p, (str, list)) for p in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"takes at most {MAX_PROMPTS} prompts per request, got {len(value)}")
            return [_one_prompt(p, f"item {i} ") for i, p in enumerate(value)]
        return [_one_prompt(value, "")]

    @model_validator(mode="after")
    def _echo(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            # OpenAI would then score the prompt tokens too; this server reports generated tokens only.
            raise ValueError("echo with logprobs is not supported (prompt tokens are not scored); "
                             "drop one of them")
        return self

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return self.logprobs


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: ``prompt`` or ``messages`` (with the chat template)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    tools: Any = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]
