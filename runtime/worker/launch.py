"""Start the ranks (or join torchrun's), and drive them from rank 0.

Rank 0 lives in the caller's process: it runs the scheduler, samples, serves HTTP, and is tensor rank 0
of pipeline stage 0. ``tprun`` alone spawns the other ``tp × pp − 1`` ranks on this host; under
torchrun (``RANK``/``WORLD_SIZE`` set) every process is started by torchrun, rank 0 drives, and the
others call ``follow``. Either way every rank joins through ``parallel`` (handshake, timeouts), watches
the others through ``liveness``, and loads; a load error on any rank is raised on rank 0 naming the rank.

A step goes from rank 0 to its stage's ranks as one compact int64 message (``wire``) and from stage to
stage with the hidden states (``pipeline``); the last stage sends the logits back to rank 0.
``submit`` returns as soon as stage 0 is done, so rank 0 can send up to ``pp`` batches into the
pipeline before it waits for the first one's logits.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from formats import layout
from formats.errors import TpDeployError
from runtime import __version__
from runtime.kv.batch import StepBatch
from runtime.model.comm import Comm
from runtime.worker.liveness import DEAD_AFTER, Liveness
from runtime.worker.parallel import (
    Identity,
    Rendezvous,
    Topology,
    env_rank,
    env_rendezvous,
    free_port,
    handshake,
    host_address,
    init_process_group,
    loopback_warning,
    open_store,
)
from runtime.worker.pipeline import PendingLogits, StageLinks
from runtime.worker.runner import ModelRunner, RunnerSpec, Step, device_for
from runtime.worker.wire import StepDecoder, StepEncoder

EXIT_RANK_DIED = 70
KEEPALIVE = 30.0  # an idle rank 0 sends an empty step this often, so no rank's wait reaches --dist-timeout
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_now(message: str) -> None:
    sys.stderr.write(f"tprun: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_RANK_DIED)


class Driver:
    """Rank 0's handle on all ranks: ``submit(step)`` starts it everywhere, ``execute(step)`` also waits
    for its logits."""

    def __init__(self, spec: RunnerSpec):
        world = spec.manifest.world
        env = env_rank()
        if env is not None:  # torchrun started every rank; this process must be rank 0
            self.topo, rdzv, self.workers = _torchrun_topology(spec, env), env_rendezvous(), []
            on_host = _ranks_on_host()
            if self.topo.rank != 0:
                raise TpDeployError(f"internal: rank {self.topo.rank} must follow, not drive")
            if (warning := loopback_warning(rdzv)) is not None:
                sys.stderr.write(f"tprun: warning: {warning}\n")
        else:
            _check_devices(spec.device, world)
            if world > 1 and dist.is_initialized():
                raise TpDeployError("a multi-rank LLM is already running in this process (rank 0 lives in the caller's "
                                    "process and torch.distributed allows one group); close() it first or use another "
                                    "process")
            self.topo = Topology(0, spec.manifest.tp, spec.manifest.pp, 0)
            rdzv, on_host = Rendezvous("127.0.0.1", free_port(), is_master=True), world
            self.workers = _spawn(spec, rdzv, self.topo)
        self._closing = False
        self._broken: str | None = None  # a step failed after the other ranks started it
        self._lock = threading.Lock()  # steps and keepalives, one at a time
        self._last_send = time.monotonic()
        self._encoder = StepEncoder()
        # Called once, from a watchdog thread, when a rank dies; the server replaces it to end its
        # streams with the reason before exiting. The default ends the process at once.
        self.on_rank_death = _exit_now
        atexit.register(self.close)  # before multiprocessing's own exit handler terminates the workers
        joined = _join(spec, self.topo, rdzv, lambda m: self._died(m), self._dead_child)
        self.comm, self.links, self.liveness = joined.comm, joined.links, joined.liveness
        try:
            self.runner = _load_everywhere(spec, self.topo, self.comm, on_host)
        except TpDeployError:
            self._closing = True  # the others exit cleanly after the same all-gather
            self._stop_liveness()  # announced: every rank stops now, on purpose
            atexit.unregister(self.close)
            raise
        if self.topo.world > 1:
            threading.Thread(target=self._keepalive, daemon=True, name="tprun-keepalive").start()

    # -- steps ---------------------------------------------------------------------------------------

    def execute(self, step: Step) -> torch.Tensor | None:
        return self.submit(step).result()

    def submit(self, step: Step) -> PendingLogits:
        """Run stage 0 of ``step`` here and hand it to the next stage; its logits come later."""
        with self._lock:
            if self.topo.world == 1:
                return PendingLogits.done(self.runner.execute(step))
            try:
                message = self._send(step)
                out = self.runner.execute(step)
                if self.topo.pp == 1:
                    return PendingLogits.done(out)
                pending = self.links.recv_logits(message)
                self.links.send_next(message, out)
                return _Watched(pending, self)
            except BaseException as e:
                self._broken = f"{type(e).__name__}: {e}"
                raise

    def _send(self, step: Step | None) -> torch.Tensor:
        """The step (None: stop) to stage 0's other ranks; the message, for the next stage."""
        message = self._encoder.encode(step)
        self.comm.broadcast_ints(message)
        self._last_send = time.monotonic()
        return message

    def _send_without_work(self, step: Step | None) -> None:
        """A step no stage computes (empty: keepalive; None: stop) to every rank of every stage."""
        message = self._send(step)
        if self.topo.pp > 1:
            self.links.send_next(message, None)

    def _keepalive(self) -> None:
        """An empty step now and then: a rank waiting for work must not take the silence for a failure."""
        interval = min(KEEPALIVE, self.runner.spec.dist_timeout / 4)
        while not self._closing:
            time.sleep(1.0)
            if self._closing or time.monotonic() - self._last_send < interval:
                continue
            with self._lock:
                if not self._closing and self.liveness.dead() is None:
                    self._send_without_work(Step([], StepBatch(())))

    # -- failures ------------------------------------------------------------------------------------

    def dead_rank(self, wait: float = 0.0) -> str | None:
        """Why the ranks cannot go on ("rank 3 on host-b stopped responding ..."), or None while all live.

        A collective usually fails on rank 0 a moment before the watchdog names the dead rank, hence ``wait``.
        After a step failed with several ranks the ranks are out of step for good (some may be waiting in a
        collective rank 0 never joins): that is fatal too, and the watchdog gets the time to name a culprit."""
        if self.topo.world == 1:
            return None
        if self._broken is None:
            return self._dead_child() or self.liveness.dead(wait)
        reason = self._dead_child() or self.liveness.dead(max(wait, DEAD_AFTER + 3))
        reason = reason or f"a step failed after the other ranks had started it ({self._broken}); the ranks are out of step"
        self._died(f"{reason}; the other ranks cannot continue, stopping")
        return reason

    def _dead_child(self) -> str | None:
        for rank, w in enumerate(self.workers, start=1):
            if w.exitcode:  # 0: a clean exit after a reported load error
                return f"rank {rank} exited unexpectedly (exit code {w.exitcode})"
        return None

    def _died(self, message: str) -> None:
        if not self._closing:
            self._closing = True  # close() must not wait on a collective the dead rank never joins
            self.on_rank_death(message)

    def _stop_liveness(self, announce: bool = True) -> None:
        if getattr(self, "liveness", None) is not None:
            self.liveness.stop(announce)

    def close(self) -> None:
        live = getattr(self, "liveness", None)
        dead = self._dead_child() or (live.dead() if live else None) or self._broken
        self._closing = True
        atexit.unregister(self.close)
        if dead:
            for w in self.workers:  # the living ranks may be stuck in a collective: end them
                w.kill()
            self.workers = []
        if getattr(self, "comm", None) is not None and self.topo.world > 1 and dist.is_initialized() and not dead:
            self._stop_liveness()
            with self._lock:
                self._send_without_work(None)
                if self.links is not None:
                    self.links.flush()
            for w in self.workers:
                w.join(timeout=30)
            dist.destroy_process_group()
        self._stop_liveness(announce=not dead)
        self.workers = []


class _Watched:
    """A pipelined step's pending logits; a failure while waiting for them breaks the run as in ``submit``."""

    def __init__(self, pending: PendingLogits, driver: Driver):
        self.pending, self.driver = pending, driver

    def result(self) -> torch.Tensor | None:
        try:
            return self.pending.result()
        except BaseException as e:
            self.driver._broken = f"{type(e).__name__}: {e}"
            raise


class _Joined:
    def __init__(self, comm: Comm, links: StageLinks | None, liveness: Liveness | None):
        self.comm, self.links, self.liveness = comm, links, liveness


def _join(spec: RunnerSpec, topo: Topology, rdzv: Rendezvous, on_death, extra_check=None) -> _Joined:
    """Handshake, watchdog, process group and stage links of this rank (nothing to do alone)."""
    device = device_for(spec, topo)
    if topo.world == 1:
        return _Joined(Comm(0, 1, device), None, None)
    timeout = timedelta(seconds=spec.dist_timeout)
    store = open_store(rdzv, topo.world, timeout)
    ranks = handshake(store, _identity(spec, topo, rdzv), topo.world, timeout)
    liveness = Liveness(rdzv, topo.rank, ranks, on_death, extra_check).start()
    comm = init_process_group(topo, store, device, timeout)
    cfg = spec.manifest.model
    links = StageLinks(topo, device, spec.dtype, cfg.hidden_size, cfg.vocab_size) if topo.pp > 1 else None
    return _Joined(comm, links, liveness)


def _identity(spec: RunnerSpec, topo: Topology, rdzv: Rendezvous) -> Identity:
    manifest = hashlib.sha256(layout.manifest_path(spec.workspace).read_bytes()).hexdigest()
    device = str(device_for(spec, topo))
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(topo.local_rank)})"
    return Identity(topo.rank, socket.gethostname(), host_address(rdzv.host), os.getpid(), device, __version__,
                    manifest, spec.settings())


def _load_everywhere(spec: RunnerSpec, topo: Topology, comm: Comm, on_host: int) -> ModelRunner | None:
    """Load this rank; every rank learns every rank's load error, so all stop together or go on together."""
    try:
        runner, error = ModelRunner(spec, topo, comm, on_host), None
    except TpDeployError as e:
        runner, error = None, str(e)
    except Exception:  # report any failure to rank 0 instead of hanging the others
        runner, error = None, traceback.format_exc(limit=3)
    errors = [error]
    if topo.world > 1:
        errors = [None] * topo.world
        dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        if topo.world > 1:
            dist.destroy_process_group()
        raise TpDeployError("; ".join(f"rank {r} failed to load: {e}" for r, e in failed))
    runner.init_cache()
    return runner


# -- the other ranks ---------------------------------------------------------------------------------

def follow(spec: RunnerSpec, topo: Topology, rdzv: Rendezvous, on_host: int) -> int:
    """A rank other than 0: join, load, then run every step rank 0 sends until it says stop. The exit
    status: 0 after a clean stop or a load error rank 0 reports, 70 when a rank died."""
    joined = _join(spec, topo, rdzv, _exit_now)
    try:
        runner = _load_everywhere(spec, topo, joined.comm, on_host)
    except TpDeployError:
        joined.liveness.stop()
        return 0  # rank 0 reports every rank's load error
    try:
        _serve_steps(runner, topo, joined)
    except Exception as e:  # noqa: BLE001 - a failed collective: name the dead rank if there is one
        reason = joined.liveness.dead(wait=20.0) or f"rank {topo.rank}: {type(e).__name__}: {e}"
        _exit_now(f"{reason}; the other ranks cannot continue, stopping")
    joined.liveness.stop()
    if joined.links is not None:
        joined.links.flush()
    dist.destroy_process_group()
    return 0


def _serve_steps(runner: ModelRunner, topo: Topology, joined: _Joined) -> None:
    decoder = StepDecoder()
    comm, links = joined.comm, joined.links
    while True:
        if topo.first:
            message, hidden = comm.broadcast_ints(None), None
        else:
            message, hidden = links.recv_prev()
        step = decoder.decode(message)
        if step is None:
            if not topo.last:
                links.send_next(message, None)
            return
        out = runner.execute(step, hidden)
        if not topo.last:
            links.send_next(message, out)
        elif topo.rank == topo.last_leader and topo.pp > 1 and out is not None:
            links.send_logits(out)


def _spawn(spec: RunnerSpec, rdzv: Rendezvous, topo: Topology) -> list:
    ctx = mp.get_context("spawn")
    # The kernel's parent-death signal fires when the *thread* that started a process ends, so it
    # is only asked for when that thread is the main one (which lives as long as the process).
    on_main = threading.current_thread() is threading.main_thread()
    client = Rendezvous(rdzv.host, rdzv.port, is_master=False, prefix=rdzv.prefix)
    workers = [ctx.Process(target=_worker_main, args=(spec, Topology(r, topo.tp, topo.pp, r), client, topo.world,
                                                      on_main), daemon=True)
               for r in range(1, topo.world)]
    for w in workers:
        w.start()
    return workers


def _worker_main(spec: RunnerSpec, topo: Topology, rdzv: Rendezvous, on_host: int, die_with_parent: bool) -> None:
    _follow_rank0(die_with_parent)
    sys.exit(follow(spec, topo, rdzv, on_host))


def _follow_rank0(die_with_parent: bool) -> None:
    """Rank 0 alone decides when a rank stops: a Ctrl-C sent to the whole process group, or systemd's
    SIGTERM to every process of the unit, must not kill ranks under a draining server. If rank 0 dies
    outright, the kernel ends this rank too (Linux), instead of leaving it blocked in a collective."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if die_with_parent and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _torchrun_topology(spec: RunnerSpec, env: tuple[int, int, int]) -> Topology:
    """This process's place from torchrun's (rank, world, local rank), once the world fits the workspace."""
    rank, world, local_rank = env
    m = spec.manifest
    if world != m.world:
        raise TpDeployError(f"torchrun started {world} processes (WORLD_SIZE) but this workspace has tp {m.tp} x pp "
                            f"{m.pp} = {m.world} ranks; launch nnodes x nproc-per-node = {m.world} processes")
    return Topology(rank, m.tp, m.pp, local_rank)


def _ranks_on_host() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's --nproc-per-node


def torchrun_follower(spec: RunnerSpec) -> int | None:
    """Under torchrun, a rank other than 0 follows rank 0 and returns its exit status; None for rank 0
    (or outside torchrun), which goes on to drive."""
    env = env_rank()
    if env is None or env[0] == 0:
        return None
    topo = _torchrun_topology(spec, env)
    _follow_rank0(die_with_parent=False)  # torchrun's agent, not rank 0, is this process's parent
    return follow(spec, topo, env_rendezvous(), _ranks_on_host())


def _check_devices(device: str, world: int) -> None:
    if device != "cuda":
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < world:
        raise TpDeployError(f"this workspace has {world} ranks (tp x pp) but {visible} CUDA device(s) are visible; "
                            f"run on {world} GPUs (check CUDA_VISIBLE_DEVICES), on several nodes with torchrun "
                            "(docs/multinode.md), re-convert with a smaller --tp/--pp, or pass --device cpu")

