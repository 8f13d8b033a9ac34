"""The serving engine: the step loop in a background thread, requests as async streams of Deltas.

uvicorn's event loop never runs a forward: ``generate`` checks the request, posts it to the loop
thread, and awaits Deltas that the loop thread hands back with ``call_soon_threadsafe``. Admission
is two-stage: at most ``max_concurrent_requests`` requests are in the scheduler (it batches them,
preempts, prefills in chunks); the rest wait in a queue of at most ``max_queue``; beyond that,
``Overloaded`` (HTTP 429). Closing a request's stream (client gone) aborts it and frees its blocks
at the next loop turn, before the next step.
"""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from formats.errors import TpDeployError
from runtime.engine.core import Sequence
from runtime.engine.sampling import SamplingParams
from runtime.serve.contract import ContextTooLong, Delta, Overloaded, ServiceUnavailable, Usage
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
    seqs: list[Sequence] = field(default_factory=list)
    last_token: dict[int, float] = field(default_factory=dict)  # sample index -> time of its last token
    first_token: bool = False

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # its event loop is gone (shut down): nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, llm, metrics: Metrics, max_concurrent_requests: int = 256, max_queue: int = 1024):
        self.llm, self.engine, self.metrics = llm, llm.engine, metrics
        self.tokenizer, self.max_model_len = llm.tokenizer, llm.max_model_len
        self.max_concurrent, self.max_queue = max_concurrent_requests, max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[_Request] = deque()
        self._active: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}
        self._usage: dict[str, Usage] = {}
        self._seen_prefix = (0, 0)
        self._seen_preemptions = 0
        self._refusal: ServiceUnavailable | None = None  # set once shutting down or a rank died
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tprun-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ----------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        if self._refusal is not None:
            raise self._refusal
        self._check(prompt_ids, params)
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

    def usage(self, request_id: str) -> Usage:
        return self._usage.pop(request_id, Usage(0, 0))

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
        self._stop.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)

    def _check(self, prompt: list[int], params: SamplingParams) -> None:
        want = len(prompt) + (params.max_tokens or 0)
        if len(prompt) >= self.max_model_len or want > self.max_model_len:
            raise ContextTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but you requested {want} "
                f"tokens ({len(prompt)} in the prompt, {params.max_tokens or 0} for the completion); shorten "
                "the prompt or lower max_tokens")
        self.engine.check(0, prompt, params)

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
                sys.stderr.write(f"tprun: engine step failed: {e!r}\n")
                for req in list(self._active.values()):
                    self._finish(req, error=TpDeployError(f"generation failed: {e}"))

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
        if self._drain(block=not self.engine.scheduler.has_work):
            self._report()  # aborts free blocks without a step: keep the gauges true
        if self.engine.scheduler.has_work:
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
        """Move queued requests into the scheduler while fewer than --max-concurrent-requests are in it."""
        while self._pending and len(self._active) < self.max_concurrent and self._refusal is None:
            self._admit(self._pending.popleft())

    def _admit(self, req: _Request) -> None:
        try:
            req.seqs = self.engine.sequences(0, req.prompt, req.params)
        except TpDeployError as e:
            req.send(e)
            return
        self._active[req.request_id] = req
        for s in req.seqs:
            self._by_seq[s.seq_id] = req
            self.engine.scheduler.add(s)

    def _abort(self, req: _Request) -> None:
        if req in self._pending:
            self._pending.remove(req)
        elif self._active.get(req.request_id) is req:
            self._finish(req)

    def _step(self) -> None:
        deltas: dict[int, str] = {}
        sampled = self.engine.step(on_delta=lambda s, text: deltas.__setitem__(s.seq_id, text))
        now, touched = time.perf_counter(), {}
        for s in sampled:
            req = self._by_seq.get(s.seq_id)
            if req is None:
                continue
            self._timing(req, s.index, now)
            lp = [s.logprobs[-1]] if s.params.logprobs is not None and s.logprobs else []
            req.send(Delta(s.index, deltas.get(s.seq_id, ""), [s.out[-1]], lp, s.finish_reason))
            touched[req.request_id] = req
        for req in touched.values():  # after every sample's Delta of this step went out
            if all(x.finish_reason for x in req.seqs):
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
        self.engine.abort(req.seqs)  # frees blocks; marks unfinished samples "abort"
        self._active.pop(req.request_id, None)
        for s in req.seqs:
            self._by_seq.pop(s.seq_id, None)
        completion = sum(len(s.out) for s in req.seqs)
        self._usage[req.request_id] = Usage(len(req.prompt), completion, max(0, min(s.cached for s in req.seqs)))
        if len(self._usage) > 10_000:  # usage is read right after the stream ends; drop strays
            self._usage.pop(next(iter(self._usage)))
        self.metrics.on_request_done(len(req.prompt), completion, time.perf_counter() - req.arrival)
        req.send(error if error is not None else _DONE)
        if error is not None:
            req.send(_DONE)
        self._promote()

    def _report(self) -> None:
        sched, blocks = self.engine.scheduler, self.engine.blocks
        self.metrics.on_step(len(sched.running), len(sched.waiting) + len(self._pending),
                             blocks.num_used / blocks.num_blocks)
        queried, hit = sched.prefix_queried, sched.prefix_hit
        if (queried, hit) != self._seen_prefix:
            self.metrics.on_prefix_cache(queried - self._seen_prefix[0], hit - self._seen_prefix[1])
            self._seen_prefix = (queried, hit)
        for _ in range(sched.preemptions - self._seen_preemptions):
            self.metrics.on_preemption()
        self._seen_preemptions = sched.preemptions

