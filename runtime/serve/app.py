"""The OpenAI-compatible HTTP layer of ``tprun serve``: routes, errors, API key, request counts, SSE.

It talks to the engine only through ``contract.EngineClient``, so it runs (and is tested) against a
fake engine. Two rules shape the code:

- every error a client can cause becomes OpenAI's ``{"error": {...}}`` body with a real status code,
  which is why the first Delta is awaited before a stream's 200 is sent (the engine checks a request,
  and raises Overloaded / InvalidPrompt / ContextTooLong, before its first Delta); a failure of the
  server itself is a 500 ``server_error`` (in-band once streaming), never the client's 400;
- a request whose client went away is aborted in the engine at once (its iterator is closed), so
  its KV blocks go back to requests that still have a reader.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from runtime import __version__
from runtime.config import DEFAULT_MAX_N
from runtime.engine.sampling import SamplingParams
from runtime.serve.contract import Delta, EngineClient, ServiceUnavailable, Usage
from runtime.serve.errors import error_response, in_band_error, install_error_handlers
from runtime.serve.metrics import CONTENT_TYPE, Metrics
from runtime.serve.middleware import Admission, CountRequests, Lifecycle, RequireApiKey
from runtime.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from runtime.serve.render import ChatRenderer, CompletionRenderer, Renderer, sse
from runtime.serve.responses import ResponsesRenderer, ResponsesRequest
from runtime.serve.streams import merge
from runtime.serve.tools import ToolPlan, parser_for_template, plan_tools, template_messages

log = logging.getLogger("tprun.serve")
T = TypeVar("T")

_CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, metrics and logs do
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def create_app(engine: EngineClient, *, served_model_name: str, api_key: str | None,
               metrics: Metrics, max_n: int = DEFAULT_MAX_N, lifecycle: Lifecycle | None = None,
               tool_call_parser: str = "auto", reasoning_parser: str = "none") -> FastAPI:
    """The ASGI app: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``,
    ``/tokenize``, ``/detokenize``, ``/health``, ``/metrics``, ``/version``, ``/ping``. With ``api_key`` every ``/v1`` route needs
    ``Authorization: Bearer <api_key>``. Once ``lifecycle.draining`` is set, new generation requests
    and health checks get 503 while the requests in flight finish."""
    app = FastAPI(title="tprun", summary="tpdeploy's OpenAI-compatible server")
    lifecycle = lifecycle or Lifecycle()
    server = _Server(engine, served_model_name, metrics, max_n, lifecycle, tool_call_parser, reasoning_parser)
    app.add_api_route("/v1/models", server.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server.get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/responses", server.responses, methods=["POST"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/ping", server.health, methods=["GET", "POST"])  # vLLM's (SageMaker's) path
    app.add_api_route("/version", server.version, methods=["GET"])
    app.add_api_route("/metrics", server.render_metrics, methods=["GET"])
    install_error_handlers(app)
    app.add_middleware(RequireApiKey, api_key=api_key)
    app.add_middleware(Admission, lifecycle=lifecycle)
    app.add_middleware(CountRequests, metrics=metrics)  # added last = outermost: sees 401s too
    return app


class _Server:
    """Route handlers; one instance per app, holding what every request needs."""

    def __init__(self, engine: EngineClient, model: str, metrics: Metrics, max_n: int,
                 lifecycle: Lifecycle, tool_call_parser: str = "auto", reasoning_parser: str = "none") -> None:
        self.engine, self.model, self._metrics = engine, model, metrics
        self.max_n, self.lifecycle = max_n, lifecycle
        self.created = int(time.time())
        template = getattr(engine.tokenizer, "chat_template", None)
        self.tool_parser = parser_for_template(template or "") if tool_call_parser == "auto" else tool_call_parser
        self.reasoning_parser = reasoning_parser

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created,
                "owned_by": "tpdeploy", "max_model_len": self.engine.max_model_len}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise APIError(404, f"the model {model!r} does not exist on this server; it serves "
                                f"{self.model!r} (GET /v1/models lists it)",
                           param="model", code="model_not_found")

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    async def health(self) -> Response:
        if self.lifecycle.draining:  # load balancers take this replica out while it drains
            return error_response(503, self.lifecycle.draining, "server_error", code="service_unavailable")
        return JSONResponse({"status": "ok"})

    async def version(self) -> dict[str, str]:
        return {"version": __version__}

    async def render_metrics(self) -> Response:
        # The engine's metrics_text() renders this same registry: serving both would list each
        # metric twice, which Prometheus rejects.
        return Response(self._metrics.render(), media_type=CONTENT_TYPE)

    def _params(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        self._check_model(body.model)
        params = body.sampling_params()
        if params.n > self.max_n:
            raise APIError(400, f"n={params.n} is more samples than this server allows (--max-n "
                                f"{self.max_n}); send several requests instead", param="n")
        return params

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        params, tools = self._chat_params(body)
        # Rendering and tokenizing a long conversation takes milliseconds: off the event loop, so
        # the streams of other requests keep flowing meanwhile.
        prompt_ids = await run_in_threadpool(self._chat_ids, body, tools)
        renderer = functools.partial(ChatRenderer, tools=tools, reasoning=self.reasoning_parser)
        return await self._generate(request, body, params, [prompt_ids], renderer, "chatcmpl")

    async def responses(self, body: ResponsesRequest, request: Request) -> Response:
        chat = body.to_chat()
        params, tools = self._chat_params(chat)
        prompt_ids = await run_in_threadpool(self._chat_ids, chat, tools)
        renderer = functools.partial(ResponsesRenderer, tools=tools, request=body)
        return await self._generate(request, chat, params, [prompt_ids], renderer, "resp")

    def _chat_params(self, body: ChatCompletionRequest) -> tuple[SamplingParams, ToolPlan | None]:
        params = self._params(body)
        tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls is not False, self.tool_parser)
        if tools is not None and tools.constraint is not None:  # required / a named function
            if params.structured_outputs is not None:
                raise APIError(400, f"tool_choice={body.tool_choice!r:.60} constrains the output to tool calls; "
                                    "it cannot be combined with response_format or guided_*", param="tool_choice")
            params = dataclasses.replace(params, structured_outputs=tools.constraint)
        return params, tools

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's ``/tokenize``: a prompt, or messages through the chat template, as token ids."""
        self._check_model(body.model)
        tok = self.engine.tokenizer
        if body.messages is not None:
            chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=body.add_generation_prompt,
                                         tools=body.tools, tool_choice="none" if body.tools else None)
            ids = await run_in_threadpool(self._chat_ids, chat, plan_tools(chat.tools, chat.tool_choice, True, "none"))
        elif isinstance(body.prompt, str):
            ids = await run_in_threadpool(tok.encode, body.prompt, body.add_special_tokens)
        else:
            raise APIError(400, "give prompt (a string) or messages", param="prompt")
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        vocab = self.engine.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens {bad[:5]} are not ids of this tokenizer (0..{vocab - 1})", param="tokens")
        return {"prompt": self.engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    def _chat_ids(self, body: ChatCompletionRequest, tools: ToolPlan | None = None) -> list[int]:
        tok = self.engine.tokenizer
        messages = template_messages([m.for_template() for m in body.messages])
        text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                       continue_final_message=body.continue_final_message,
                                       tools=None if tools is None else tools.template_tools,
                                       **(body.chat_template_kwargs or {}))
        return tok.encode(text, add_special_tokens=False)  # the template wrote BOS already

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        params = self._params(body)
        tok = self.engine.tokenizer
        ids = [await run_in_threadpool(tok.encode, p) if isinstance(p, str) else p for p in body.prompt]
        echo = None
        if body.echo:  # the prompt as the model saw it, before each choice's text
            echo = [p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in body.prompt]
        return await self._generate(request, body, params, ids, CompletionRenderer, "cmpl", echo)

    async def _generate(self, request: Request, body: Any, params: SamplingParams,
                        prompts: list[list[int]], renderer_cls: Callable[..., Renderer], prefix: str,
                        echo: list[str] | None = None) -> Response:
        # The engine checks each prompt (empty, ids past the vocabulary, context window, cache) once.
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        renderer = renderer_cls(request_id, int(time.time()), self.model, self.engine.tokenizer,
                                logprobs=params.logprobs is not None,
                                include_usage=body.include_usage)
        # One engine request per prompt; their choices are numbered prompt-major, as OpenAI does.
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        n = params.n * len(prompts)
        prefixes = None if echo is None else [echo[i // params.n] for i in range(n)]
        stream = merge([self.engine.generate(r, p, params) for r, p in zip(ids, prompts)], params.n)
        streaming = False
        try:
            # The engine refuses (Overloaded, InvalidPrompt, ContextTooLong) before its first Delta: wait
            # for it so that a refusal still gets its status code, and give up if the client leaves meanwhile.
            done, first = await _unless_disconnected(request, lambda: anext(stream, None))
            if done and body.stream:
                streaming = True  # from here on the response closes the stream
                events = self._events(renderer, n, first, stream, prefixes)
                return _EventStream(events, stream)
            if done:
                done, deltas = await _unless_disconnected(request, lambda: _collect(first, stream))
        finally:
            if not streaming:
                await _close(stream)
        if not done:
            return Response(status_code=_CLIENT_CLOSED)
        return JSONResponse(renderer.response(deltas, n, _total([d.usage for d in deltas]), prefixes))

    async def _events(self, renderer: Renderer, n: int, first: Delta | None,
                      stream: AsyncIterator[Delta], prefixes: list[str] | None) -> AsyncIterator[bytes]:
        """The SSE body. Its finally aborts the engine request when the client goes away."""
        unfinished = set(range(n))
        usages: list[Usage | None] = []  # each engine request's last Delta carries its usage
        try:
            for chunk in renderer.opening_chunks(n, prefixes):
                yield sse(chunk)
            delta = first
            while delta is not None:
                for chunk in renderer.delta_chunks(delta):
                    yield sse(chunk)
                if delta.finish_reason is not None:
                    unfinished.discard(delta.index)
                usages.append(delta.usage)
                delta = await anext(stream, None)
            if renderer.include_usage:
                yield sse(renderer.usage_chunk(_total(usages)))
        except Exception as e:  # the 200 is already sent: report in-band, as OpenAI does
            if not isinstance(e, ServiceUnavailable):
                log.exception("request %s failed mid-stream", renderer.id)
            for index in sorted(unfinished):  # every choice ends with a reason, as in vLLM
                yield sse(renderer.finish_chunk(index, "error"))
            yield sse(in_band_error(e))
        finally:
            await _close(stream)
        yield b"data: [DONE]\n\n"


def _total(usages: list[Usage | None]) -> Usage:
    """The usage of a response: the sum over its engine requests (one per prompt)."""
    parts = [u for u in usages if u is not None]
    return Usage(sum(u.prompt_tokens for u in parts), sum(u.completion_tokens for u in parts),
                 sum(u.cached_prompt_tokens for u in parts))


async def _collect(first: Delta | None, stream: AsyncIterator[Delta]) -> list[Delta]:
    deltas = []
    while first is not None:
        deltas.append(first)
        first = await anext(stream, None)
    return deltas


async def _close(stream: AsyncIterator[Delta]) -> None:
    """Abort the request in the engine (no-op once finished); shielded because it usually runs in a
    task that is being cancelled, and an unfinished close would leak the request's KV blocks."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


async def _unless_disconnected(request: Request,
                               work: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """``(True, await work())``, or ``(False, None)`` if the client hangs up first (work is cancelled).

    Starlette notices a disconnect only while streaming a body, so waits before that are watched
    here: once the request body was read, ``receive()`` returns only when the client is gone.
    """
    result: list[T] = []
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        async def run() -> None:
            nonlocal error
            try:
                result.append(await work())
            except Exception as e:  # re-raised below, unwrapped from the task group's ExceptionGroup
                error = e
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if error is not None:
        raise error
    return (True, result[0]) if result else (False, None)


class _EventStream(StreamingResponse):
    """SSE response that aborts the engine request however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], engine_stream: AsyncIterator[Delta]) -> None:
        super().__init__(events, headers=_SSE_HEADERS)
        self._engine_stream = engine_stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # When the client goes away Starlette cancels the sending task (or send raises) and
            # leaves our generator suspended at a yield (or never started): close both here.
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            await _close(self._engine_stream)
