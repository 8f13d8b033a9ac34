"""Launch tprun across "nodes" on one machine: real torchrun invocations with --nnodes, one per node rank,
meeting on a loopback rendezvous; or srun-style processes given RANK / WORLD_SIZE directly."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from runtime.worker.parallel import free_port
from tests.e2e.server import wait_healthy

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


class Nodes:
    """``nnodes`` torchrun agents, each starting ``nproc`` ranks of ``tprun <command> ...``."""

    def __init__(self, nnodes: int, nproc: int, args_of_node, log_dir: Path):
        self.rdzv = free_port()
        self.procs, self.logs = [], []
        for node in range(nnodes):
            log = Path(log_dir) / f"node{node}.log"
            cmd = [TORCHRUN, "--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--node-rank", str(node),
                   "--rdzv-endpoint", f"127.0.0.1:{self.rdzv}", "-m", "runtime", *args_of_node(node)]
            f = open(log, "w")  # noqa: SIM115 - closed in wait()
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                               env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            self.logs.append((log, f))

    def all_pids(self) -> list[int]:
        """Every agent and every rank process it started."""
        pids = []
        for p in self.procs:
            try:
                pids += [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return pids

    def ranks_of(self, node: int) -> list[psutil.Process]:
        """The rank processes node ``node``'s agent started (python processes running tprun)."""
        return [c for c in psutil.Process(self.procs[node].pid).children(recursive=True)
                if "runtime" in " ".join(c.cmdline())]

    def wait(self, timeout: float) -> list[int]:
        """Every agent's exit code (killing all that are still running at the deadline)."""
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.time())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        self.kill()
        return codes

    def kill(self) -> None:
        for pid in self.all_pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()
        for _, f in self.logs:
            f.close()

    def log(self, node: int) -> str:
        return self.logs[node][0].read_text()

    def text(self) -> str:
        return "\n".join(f"--- node {i}\n{self.log(i)}" for i in range(len(self.procs)))


def wait_nodes_healthy(url: str, nodes: Nodes, timeout: float = 240) -> None:
    def exited() -> str | None:
        if any(p.poll() is not None for p in nodes.procs):
            return f"a node exited before the server was healthy:\n{nodes.text()}"
        return None

    if not wait_healthy(url, exited, timeout):
        raise RuntimeError(f"the server did not become healthy in {timeout} s:\n{nodes.text()}")


def srun_style(ranks: list[int], world: int, args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Processes for some ranks of a ``world``, each given its rank as srun + a wrapper script would."""
    port = free_port()
    procs = []
    for r in ranks:
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE":
               str(len(ranks)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        f = open(Path(log_dir) / f"rank{r}.log", "w")  # noqa: SIM115 - the process owns it
        procs.append(subprocess.Popen([sys.executable, "-m", "runtime", *args], cwd=ROOT, env=env, stdout=f,
                                      stderr=subprocess.STDOUT))
    return procs
