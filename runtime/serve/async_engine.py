"""The serving engine: ``Engine`` in a background thread, requests as async streams of its Deltas.

A thin adapter: it only calls the engine's contract (check, add, abort, step, stats) and owns what the
engine knows nothing about — asyncio, admission and metrics. uvicorn's event loop never runs a
forward: ``generate`` refuses what the engine would refuse (at once, not after a wait in the queue),
posts the request to the loop thread, and awaits the Deltas that the loop thread hands back with
``call_soon_threadsafe``. Admission is two-stage: at most ``max_concurrent_requests`` requests are in
the engine (it batches them, preempts, prefills in chunks); the rest wait in a queue of at most
``max_queue``; beyond that, ``Overloaded`` (HTTP 429). Closing a request's stream (client gone) aborts
it and frees its blocks at the next loop turn, before the next step. A step that raises is a server
fault: the requests in flight end with ``ServerError`` and the loop goes on serving.
"""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from formats.errors import TpDeployError
from runtime.engine.outputs import EngineStats
from runtime.engine.sampling import SamplingParams
from runtime.serve.contract import Delta, Overloaded, ServerError, ServiceUnavailable
from runtime.serve.metrics import Metrics

_DONE = object()  # end of a request's stream


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    last_token: dict[int, float] = field(default_factory=dict)  # sample index -> time of its last token
    first_token: bool = False
    completion_tokens: int = 0  # sent so far, all samples together

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # its event loop is gone (shut down): nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, llm, metrics: Metrics, max_concurrent_requests: int = 256, max_queue: int = 1024):
        """Step ``llm`` (loaded by the caller, who closes it) on a thread of its own; ``load`` is what the
        server uses."""
        self._setup(llm, metrics, max_concurrent_requests, max_queue)
        self._thread = threading.Thread(target=self._run, name="tprun-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, open_llm: Callable[[], Any], metrics: Metrics, max_concurrent_requests: int = 256,
             max_queue: int = 1024) -> AsyncEngine:
        """Load the model on the engine's thread, which then steps it and, once ``close``d, closes it; returns
        when the model is loaded (the loader's error, a user's one included, is raised here).

        Why the loading thread must be the stepping one: OpenMP keeps a thread pool per thread that starts
        parallel work, and on CPU the pool of a thread that starts after the loader's ran the same oneDNN
        linears ~1.5x slower (2-vCPU VM: 140 vs 205 us for a SmolLM2 MLP linear), which cost the server
        17-25 % of the engine's tokens/s. Owning the model's whole life also keeps the rank processes it
        spawns alive until they are stopped: their parent-death signal follows the thread that spawned them."""
        self = cls.__new__(cls)
        ready: Future = Future()

        def own() -> None:
            llm = None
            try:
                llm = open_llm()
                self._setup(llm, metrics, max_concurrent_requests, max_queue)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which re-raises it
                if llm is not None:  # opened: it (and its rank processes) must not outlive the failed setup
                    llm.close()
                ready.set_exception(e)
                return
            ready.set_result(None)
            try:
                self._run()
            finally:
                llm.close()

        self._thread = threading.Thread(target=own, name="tprun-engine", daemon=True)
        self._thread.start()
        ready.result()
        return self

    def _setup(self, llm, metrics: Metrics, max_concurrent_requests: int, max_queue: int) -> None:
        self.llm, self.engine, self.metrics = llm, llm.engine, metrics
        self.tokenizer, self.max_model_len = llm.tokenizer, llm.max_model_len
        self.max_concurrent, self.max_queue = max_concurrent_requests, max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[_Request] = deque()
        self._active: dict[str, _Request] = {}  # in the engine
        self._seen = EngineStats(0, 0, 0, 1, 0, 0, 0)  # counters already passed on to the metrics
        self._refusal: ServiceUnavailable | None = None  # set once shutting down or a rank died
        self._stop = threading.Event()

    # -- event-loop side ----------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        if self._refusal is not None:
            raise self._refusal
        self.engine.check(prompt_ids, params)  # the engine's own check (stateless): before queueing
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"the server is at capacity: {len(self._active)} requests running and "
                             f"{len(self._pending)} queued (--max-queue {self.max_queue}); retry shortly")
        req = _Request(request_id, list(prompt_ids), params, asyncio.Queue(), asyncio.get_running_loop())
        self._inbox.put(("add", req))
        finished = False
        try:
            while (item := await req.out.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
            finished = True
        finally:
            if not finished:  # the client went away or the consumer stopped: free the blocks now
                self._inbox.put(("abort", req))

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def abort_all(self, error: ServiceUnavailable) -> None:
        """End every request with ``error`` and refuse new ones. Safe from any thread: the streams are
        told at once (the loop thread may be stuck in a collective with a dead rank), and the loop
        frees their blocks when it next turns."""
        self._refusal = error
        for req in [*list(self._pending), *list(self._active.values())]:
            req.send(error)
            req.send(_DONE)
        self._inbox.put(("fail", error))

    def close(self) -> None:
        """Stop stepping (and, when ``load`` made it, close the model on the engine's thread)."""
        self._stop.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)

    # -- loop-thread side ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as e:  # a failed turn fails the requests in flight, never the loop itself
                dead = self._dead_rank()
                if dead is not None:  # not a step's fault: every request ends, and so does the server
                    self._fail_all(ServiceUnavailable(f"{dead}; the server is stopping"))
                    continue
                self._step_failed(e)

    def _step_failed(self, e: Exception) -> None:
        """A server fault: the requests in the engine end with ServerError; the queue keeps its turn."""
        sys.stderr.write(f"tprun: engine step failed; ending {len(self._active)} request(s) with a server "
                         f"error:\n{traceback.format_exc()}")
        self.metrics.on_step_failure()
        for req in list(self._active.values()):
            self._finish(req, error=ServerError(f"generation failed: {e}"))

    def _dead_rank(self) -> str | None:
        driver = getattr(self.llm, "driver", None)
        return driver.dead_rank(wait=2.0) if driver is not None and hasattr(driver, "dead_rank") else None

    def _fail_all(self, error: ServiceUnavailable) -> None:
        self._refusal = error
        while self._pending:
            req = self._pending.popleft()
            req.send(error)
            req.send(_DONE)
        for req in list(self._active.values()):
            self._finish(req, error=error)

    def _turn(self) -> None:
        if self._drain(block=not self.engine.has_work):
            self._report()  # aborts free blocks without a step: keep the gauges true
        if self.engine.has_work:
            self._step()

    def _drain(self, block: bool) -> bool:
        """Take every posted add/abort; True if there were any."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind, req = item
            if kind == "add" and self._refusal is not None:  # posted just before the refusal
                req.send(self._refusal)
                req.send(_DONE)
            elif kind == "add":
                self._pending.append(req)
            elif kind == "abort":
                self._abort(req)
            elif kind == "fail":
                self._fail_all(req)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._promote()
        return True

    def _promote(self) -> None:
        """Move queued requests into the engine while fewer than --max-concurrent-requests are in it."""
        while self._pending and len(self._active) < self.max_concurrent and self._refusal is None:
            req = self._pending.popleft()
            try:
                self.engine.add(req.request_id, req.prompt, req.params)
            except TpDeployError as e:  # the client's: its stream raises it, nobody else is touched
                req.send(e)
                continue
            except Exception as e:  # a bug, not the client's
                sys.stderr.write(f"tprun: adding request {req.request_id} failed:\n{traceback.format_exc()}")
                req.send(ServerError(f"the engine could not take the request: {e}"))
                continue
            self._active[req.request_id] = req

    def _abort(self, req: _Request) -> None:
        if req in self._pending:
            self._pending.remove(req)
        elif self._active.get(req.request_id) is req:
            self._finish(req)

    def _step(self) -> None:
        deltas = self.engine.step()
        now = time.perf_counter()
        for d in deltas:
            req = self._active.get(d.request_id)
            if req is None:
                continue
            self._timing(req, d.index, now)
            req.completion_tokens += len(d.token_ids)
            req.send(d)
            if d.finished:  # the request's last Delta, after every other Delta of it went out
                self._finish(req)
        self._report()

    def _timing(self, req: _Request, index: int, now: float) -> None:
        if not req.first_token:
            req.first_token = True
            self.metrics.on_first_token(now - req.arrival)
        elif index in req.last_token:
            self.metrics.on_token_gap(now - req.last_token[index])
        req.last_token[index] = now

    def _finish(self, req: _Request, error: Exception | None = None) -> None:
        self.engine.abort(req.request_id)  # frees the blocks of an unfinished request; no-op otherwise
        self._active.pop(req.request_id, None)
        self.metrics.on_request_done(len(req.prompt), req.completion_tokens, time.perf_counter() - req.arrival)
        req.send(error if error is not None else _DONE)
        if error is not None:
            req.send(_DONE)
        self._promote()

    def _report(self) -> None:
        stats, seen = self.engine.stats(), self._seen
        self.metrics.on_step(stats.running, stats.waiting + len(self._pending), stats.kv_usage)
        if (stats.prefix_queried, stats.prefix_hit) != (seen.prefix_queried, seen.prefix_hit):
            self.metrics.on_prefix_cache(stats.prefix_queried - seen.prefix_queried, stats.prefix_hit - seen.prefix_hit)
        for _ in range(stats.preemptions - seen.preemptions):
            self.metrics.on_preemption()
        self._seen = stats
