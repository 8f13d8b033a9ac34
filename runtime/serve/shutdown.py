"""How ``tprun serve`` ends: drained on SIGTERM/SIGINT, loudly on a dead rank, never mid-sentence.

uvicorn's own handler stops accepting, gives open connections a few seconds, cuts the rest, and then
re-raises the signal (exit 143) — streams end without a finish reason. Here the first signal starts a
drain instead: new generation requests and ``/health`` get 503 (load balancers move on), requests in
flight may finish for ``--shutdown-timeout`` seconds, the rest end with ``finish_reason: "error"``,
an error event and ``[DONE]``; then the server stops and the command stops the ranks and exits 0. A
second signal stops at once.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn

from formats.errors import TpDeployError
from runtime.serve.contract import EngineClient, ServiceUnavailable
from runtime.serve.middleware import Lifecycle

DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds in-flight requests may take after SIGTERM (k8s grace: 30)
_CLOSE_WAIT = 5.0  # after ending the stragglers: time for their last events to reach the clients
_HARD_EXIT_AFTER = 60.0  # a dead rank: the process ends by then even if something else hangs
EXIT_RANK_DIED = 70  # EX_SOFTWARE, as the offline path uses


def listen(host: str, port: int) -> socket.socket:
    """Bind the port before the model loads, so a port in use fails in a second, not after loading."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise TpDeployError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port "
                            "(or stop what is using it) or another --host") from e
    return sock


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, lifecycle: Lifecycle,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.lifecycle, self.shutdown_timeout = engine, lifecycle, shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self._begin(f"received {signal.Signals(sig).name}", self.shutdown_timeout)

    def rank_died(self, message: str) -> None:
        """The driver's watchdog (its own thread): end every stream with the reason, then exit 70."""
        sys.stderr.write(f"tprun: {message}\n")
        self.exit_code = EXIT_RANK_DIED
        self.engine.abort_all(ServiceUnavailable(f"{message.split(';')[0]}; the server is stopping"))
        timer = threading.Timer(_HARD_EXIT_AFTER, os._exit, (EXIT_RANK_DIED,))
        timer.daemon = True
        timer.start()
        if self._loop is None:  # not serving yet
            os._exit(EXIT_RANK_DIED)
        self._begin("a rank died", 0.0)

    def _begin(self, reason: str, timeout: float) -> None:
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(reason, timeout)))

    async def _drain(self, reason: str, timeout: float) -> None:
        self.lifecycle.draining = "the server is shutting down; send the request to another replica"
        if not self.lifecycle.idle:
            sys.stderr.write(f"tprun: {reason}: letting {self.lifecycle.in_flight} request(s) finish "
                             f"(up to {timeout:g} s; a second signal stops at once)\n")
        if not await self._until_idle(timeout):
            self.engine.abort_all(ServiceUnavailable(
                f"the server is shutting down and this request did not finish within "
                f"--shutdown-timeout {timeout:g} s"))
            await self._until_idle(_CLOSE_WAIT)
        self.should_exit = True

    async def _until_idle(self, timeout: float) -> bool:
        deadline = self._loop.time() + timeout
        while not self.lifecycle.idle and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.lifecycle.idle
