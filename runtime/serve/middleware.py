"""The server's middleware: API key, admission while draining, request counts by route and status."""
from __future__ import annotations

import secrets
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.serve.errors import error_response
from runtime.serve.metrics import Metrics

# Route labels for tprun_requests_total; any other path counts as "other" so that scanners
# probing random URLs cannot grow the label set without bound.
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                    "/version", "/ping"})
_GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


class Lifecycle:
    """What shutdown needs to see: requests in flight, and whether new ones are still admitted."""

    def __init__(self) -> None:
        self.draining: str | None = None  # why new requests get 503, once shutting down
        self.in_flight = 0  # generation requests whose response has not ended

    @property
    def idle(self) -> bool:
        return self.in_flight == 0


class RequireApiKey:
    """401 for a /v1 request without ``Authorization: Bearer <key>``; /health and /metrics stay
    open so that load balancers and Prometheus need no secret."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.key = app, None if api_key is None else api_key.encode()

    def _problem(self, scope: Scope) -> str | None:
        header = dict(scope["headers"]).get(b"authorization")
        if header is None:
            return ("this server needs an API key: send the header 'Authorization: Bearer <key>' "
                    "(OpenAI clients: api_key=<key>)")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
            return "invalid API key: send 'Authorization: Bearer <key>' with the server's key"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.key is not None and scope["type"] == "http" and (
                path == "/v1" or path.startswith("/v1/")):
            problem = self._problem(scope)
            if problem is not None:
                response = error_response(401, problem, code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class Admission:
    """While draining: 503 for new generation requests; counts those in flight for the drain."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in _GENERATION_ROUTES:
            return await self.app(scope, receive, send)
        if self.lifecycle.draining:
            response = error_response(503, self.lifecycle.draining, "server_error", code="service_unavailable",
                              headers={"Connection": "close", "Retry-After": "1"})
            return await response(scope, receive, send)
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


class CountRequests:
    """``tprun_requests_total{route,status}``: the status as sent, 500 when the app raised."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else \
            "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        status = 500

        async def send_counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.on_http_response(route, status)
