"""A real `tprun serve` process on loopback, for the API tests and the serving benchmark."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from runtime.worker.parallel import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_healthy(url: str, exited, timeout: float) -> bool:
    """Poll ``url``/health until 200 (True) or the deadline (False); ``exited()`` says why the server
    can never come up (its process ended), and that is raised."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        why = exited()
        if why:
            raise RuntimeError(why)
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


class Server:
    def __init__(self, workspace: Path, *args: str, api_key: str | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "runtime", "serve", str(workspace), "--port", str(self.port), "--device", "cpu",
               "--served-model-name", "smollm2", *args] + (["--api-key", api_key] if api_key else [])
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.log = ""
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 180) -> None:
        def exited() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"tprun serve exited with {self.proc.returncode}:\n{self.proc.stdout.read()}"

        if not wait_healthy(self.url, exited, timeout):
            self.close()
            raise RuntimeError(f"tprun serve did not become healthy in {timeout} s")

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all label sets) from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
        return sum(values)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no request runs or waits and no KV block is in use."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if (self.metric("tprun_kv_cache_usage_ratio") == 0 and self.metric("tprun_requests_running") == 0
                    and self.metric("tprun_requests_waiting") == 0):
                return
            time.sleep(0.2)
        raise AssertionError("the server did not free every KV block")

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log = self.proc.stdout.read() if self.proc.stdout else ""
        return self.log
