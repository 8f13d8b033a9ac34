"""Heartbeats: how every rank learns, within seconds, that another rank is gone, and which one.

A collective whose peer died may fail at once (gloo sees the socket close), fail only at its timeout
(NCCL, a node that vanished without closing its connections), or never start (a rank idle waiting for
the next step). So every rank also runs a thread that bumps its own counter on the rendezvous store
once per ``PERIOD`` and watches everyone else's: a counter that stands still for ``DEAD_AFTER``
seconds names a dead rank, and a store that stops answering means rank 0's host is gone. Counters are
compared with this rank's own clock only, so hosts need not agree on the time.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from runtime.worker.parallel import Identity, Rendezvous, open_store

PERIOD = 1.0
DEAD_AFTER = 15.0  # well inside the 60 s in which every rank must have exited after one dies
STORE_TIMEOUT = 10.0


class Liveness:
    """This rank's heartbeat and its watch over the others; ``on_death(message)`` is called once."""

    def __init__(self, rdzv: Rendezvous, rank: int, ranks: list[Identity], on_death: Callable[[str], None],
                 extra_check: Callable[[], str | None] | None = None):
        from datetime import timedelta

        self.rank, self.ranks, self.on_death, self.extra_check = rank, ranks, on_death, extra_check
        self._store = open_store(Rendezvous(rdzv.host, rdzv.port, False, rdzv.prefix), len(ranks),
                                 timedelta(seconds=STORE_TIMEOUT))
        self._dead: str | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tprun-liveness")

    def start(self) -> Liveness:
        self._thread.start()
        return self

    def stop(self, announce: bool = True) -> None:
        """End the watch; ``announce`` (a clean end) tells the others, so ranks that stop beating now are
        not reported dead. A failed run does not announce: the others must notice and exit."""
        if not self._stopped.is_set():
            self._stopped.set()
            if not announce:
                return
            try:
                self._store.set("stopping", str(self.rank))
            except Exception:  # noqa: BLE001 - the store may already be gone; nothing to tell
                pass

    def dead(self, wait: float = 0.0) -> str | None:
        """Why the ranks cannot go on, or None while all live; waits up to ``wait`` s for a verdict."""
        deadline = time.monotonic() + wait
        while self._dead is None and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.1)
        return self._dead

    def _run(self) -> None:
        keys = [f"hb/{r.rank}" for r in self.ranks]
        last = {r.rank: (None, time.monotonic()) for r in self.ranks}
        while not self._stopped.is_set():
            message = self.extra_check() if self.extra_check else None
            if message is None:
                message = self._beat(keys, last)
            if message is not None and not self._stopped.is_set():
                if self._stopping():
                    return  # rank 0 ended the run; the others stop on their own
                self._dead = message
                self.on_death(f"{message}; the other ranks cannot continue, stopping")
                return
            self._stopped.wait(PERIOD)

    def _beat(self, keys: list[str], last: dict) -> str | None:
        try:
            self._store.add(f"hb/{self.rank}", 1)
            values = self._store.multi_get(keys)
        except Exception as e:  # noqa: BLE001 - any store failure means its host is unreachable
            if self._stopped.is_set():
                return None
            return (f"the rendezvous store (hosted with rank 0 on {self.ranks[0].host}) stopped answering ({e}); "
                    "rank 0 or its node is gone")
        now = time.monotonic()
        for r, value in zip(self.ranks, values):
            seen, since = last[r.rank]
            if value != seen:
                last[r.rank] = (value, now)
            elif r.rank != self.rank and now - since > DEAD_AFTER:
                return (f"rank {r.rank} on {r.host} ({r.address}, pid {r.pid}) stopped responding "
                        f"(no heartbeat for {DEAD_AFTER:g} s)")
        return None

    def _stopping(self) -> bool:
        try:
            return self._store.check(["stopping"])
        except Exception:  # noqa: BLE001
            return False
