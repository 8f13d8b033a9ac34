"""Every error as OpenAI's ``{"error": {...}}`` body with a real status: the client's mistakes 400-429,
the server's own faults 500/503 (in-band once a stream has started)."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from formats.errors import TpDeployError
from runtime.serve.contract import ContextTooLong, InvalidPrompt, Overloaded, ServerError, ServiceUnavailable
from runtime.serve.protocol import APIError, error_body

log = logging.getLogger("tprun.serve")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def in_band_error(e: Exception) -> dict[str, Any]:
    if isinstance(e, ServiceUnavailable):
        return error_body(str(e), "server_error", code="service_unavailable")
    if isinstance(e, ServerError):
        return error_body(str(e), "server_error")
    if isinstance(e, TpDeployError):
        return error_body(str(e), "invalid_request_error")
    return error_body(f"internal server error ({type(e).__name__}); see the server log", "server_error")


def _validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Message and param of the first problem pydantic (or FastAPI's JSON parser) found."""
    err = errors[0]
    kind, loc = err["type"], [p for p in err["loc"] if p != "body"]
    if kind == "json_invalid":
        reason = err.get("ctx", {}).get("error", err["msg"])
        return f"the request body is not valid JSON: {reason} (at character {err['loc'][-1]})", None
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if kind == "value_error":  # our validators' own messages already say what was received
        return (f"{param}: " if param else "") + str(err["ctx"]["error"]), param
    if not loc:
        return "the request body must be a JSON object (sent with Content-Type: application/json)", None
    if kind == "missing":
        return f"{param} is required", param
    return f"{param}: {err['msg']} (received {err['input']!r:.80})", param


def _prompt_param(request: Request) -> str:
    return "messages" if request.url.path.endswith("/chat/completions") else "prompt"


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to OpenAI's error body (Starlette picks the most specific class)."""

    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_error(list(e.errors()))
        return error_response(400, message, param=param)

    async def overloaded(_: Request, e: Overloaded) -> JSONResponse:
        return error_response(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                      headers={"Retry-After": str(max(1, int(e.retry_after)))})

    async def bad_prompt(request: Request, e: InvalidPrompt) -> JSONResponse:
        code = "context_length_exceeded" if isinstance(e, ContextTooLong) else None
        return error_response(400, str(e), param=_prompt_param(request), code=code)

    async def unavailable(_: Request, e: ServiceUnavailable) -> JSONResponse:
        return error_response(503, str(e), "server_error", code="service_unavailable")

    async def user_error(_: Request, e: TpDeployError) -> JSONResponse:
        return error_response(400, str(e))

    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)

    async def server_error(request: Request, e: ServerError) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, e)
        return error_response(500, str(e), "server_error")

    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error_response(500, f"internal server error ({type(e).__name__}); see the server log",
                      "server_error")

    for cls, handler in ((APIError, api_error), (RequestValidationError, invalid),
                         (Overloaded, overloaded), (InvalidPrompt, bad_prompt),
                         (ServiceUnavailable, unavailable), (ServerError, server_error),
                         (TpDeployError, user_error), (HTTPException, http_error),
                         (Exception, crash)):
        app.add_exception_handler(cls, handler)
