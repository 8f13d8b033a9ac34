"""A server under benchmark, as a process: how long it takes to start and how much memory it holds.

Every server (``tprun serve``, ``vllm serve``) is started and measured the same way:
- startup: from just before ``Popen`` to the first HTTP 200 from ``/health`` followed by a 200 from
  ``/v1/models`` (polled every STARTUP_POLL_S; both servers bind their port before loading, so an early
  poll waits in the listen queue and is answered the moment the app serves);
- peak RSS: the largest sum of resident set sizes over the process and all its descendants (rank
  workers, engine cores), sampled every RSS_PERIOD_S from ``Popen`` until the server is stopped, so
  loading, warm-up and the load itself all count. Pages shared between processes (libraries, a
  memory-mapped checkpoint) count once per process that maps them, as RSS does.
The server's output goes to a file, never to a pipe nobody reads.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

RSS_PERIOD_S = 0.2
STARTUP_POLL_S = 0.05
STARTUP_TIMEOUT_S = 1800.0  # vLLM compiles its CPU graph at start; on a small, busy machine that is minutes
STOP_TIMEOUT_S = 60.0
GIB = 1 << 30


class _PeakRss(threading.Thread):
    """Samples the RSS of a process tree until stopped; ``peak`` in bytes."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, self.sample())
            self._halt.wait(RSS_PERIOD_S)

    def sample(self) -> int:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


class ServedProcess:
    """``cmd`` started now; returns once it serves (or raises with its log). Stop it with ``close``."""

    def __init__(self, name: str, cmd: list[str], port: int, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self._logfile = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._logfile, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own group: close() can reach stray children
        self._rss = _PeakRss(self.proc.pid)
        self._rss.start()
        self.peak_rss = 0
        self.log: str | None = None  # the server's output, once closed
        try:
            self._wait_serving()
        except BaseException:
            print(f"bench_serve: {name} log:\n{self.close()[-6000:]}", file=sys.stderr)
            raise
        self.startup_s = time.perf_counter() - t0

    def _wait_serving(self) -> None:
        deadline = time.perf_counter() + STARTUP_TIMEOUT_S
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before serving")
                try:
                    if (client.get(f"{self.url}/health").status_code == 200
                            and client.get(f"{self.url}/v1/models").status_code == 200):
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(STARTUP_POLL_S)
        raise RuntimeError(f"{self.name} did not serve within {STARTUP_TIMEOUT_S:.0f} s")

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all label sets) from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def wait_idle(self, metrics: tuple[str, ...], timeout: float = 60) -> None:
        """Until every one of ``metrics`` (requests running/waiting, KV blocks in use) reads 0."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self.metric(m) == 0 for m in metrics):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not go idle in {timeout:.0f} s ({', '.join(metrics)})")

    def close(self) -> str:
        """SIGTERM, then SIGKILL to its process group after STOP_TIMEOUT_S; the peak RSS is fixed here.
        Returns the server's log; a second call returns it again."""
        if self.log is not None:
            return self.log
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._rss.is_alive():
            self.peak_rss = self._rss.stop()
        _reap_group(self.proc.pid)
        self._logfile.flush()
        self.log = Path(self._logfile.name).read_text(errors="replace")
        self._logfile.close()
        Path(self._logfile.name).unlink(missing_ok=True)
        return self.log


def _reap_group(pgid: int) -> None:
    """Children the server left behind in its own process group (an engine core that outlived its
    front end) would skew the next server's numbers: end them."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return
    os.killpg(pgid, signal.SIGTERM)
    time.sleep(2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
