"""Start one process per rank and drive them from rank 0.

Rank 0 lives in the caller's process (it also samples and, later, serves HTTP); ranks 1..tp-1 are
spawned processes that loop on steps broadcast by rank 0 (compact messages, ``wire``). Loading errors
on any rank are gathered and raised on rank 0 with the rank named, instead of leaving the others hanging.
"""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from formats.errors import TpDeployError
from runtime.model.comm import Comm
from runtime.worker.parallel import free_port, init_process_group
from runtime.worker.runner import ModelRunner, RunnerSpec, Step
from runtime.worker.wire import StepDecoder, StepEncoder

STEP_TIMEOUT = timedelta(minutes=10)  # a collective that waits longer means a rank died
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_now(message: str) -> None:
    sys.stderr.write(f"tprun: {message}\n")
    sys.stderr.flush()
    os._exit(70)


class Driver:
    """Rank 0's handle on all ranks: ``execute(step)`` runs it everywhere and returns the logits."""

    def __init__(self, spec: RunnerSpec):
        tp = spec.manifest.tp
        _check_devices(spec.device, tp)
        if tp > 1 and dist.is_initialized():
            raise TpDeployError("a multi-rank LLM is already running in this process (rank 0 lives in the caller's "
                                "process and torch.distributed allows one group); close() it first or use another process")
        port = free_port()
        ctx = mp.get_context("spawn")
        # The kernel's parent-death signal fires when the *thread* that started a process ends, so it
        # is only asked for when that thread is the main one (which lives as long as the process).
        on_main = threading.current_thread() is threading.main_thread()
        self.workers = [ctx.Process(target=_worker_main, args=(spec, r, tp, port, on_main), daemon=True)
                        for r in range(1, tp)]
        for w in self.workers:
            w.start()
        self._closing = False
        self._encoder = StepEncoder()
        # Called once, from the watchdog thread, when a rank dies; the server replaces it to end its
        # streams with the reason before exiting. The default ends the process at once.
        self.on_rank_death = _exit_now
        atexit.register(self.close)  # before multiprocessing's own exit handler terminates the workers
        threading.Thread(target=self._watch, daemon=True, name="tprun-watchdog").start()
        self.comm = init_process_group(0, tp, port, torch.device(spec.device))
        runner, error = _load(spec, 0, self.comm)
        try:
            _raise_load_errors(self.comm, error)
        except TpDeployError:
            self._closing = True  # the workers exit cleanly after the same all-gather
            atexit.unregister(self.close)
            raise
        runner.init_cache(self.comm)
        self.runner = runner

    def execute(self, step: Step) -> torch.Tensor | None:
        if self.comm.world > 1:
            self._send(step)
        return self.runner.execute(step)

    def _send(self, step: Step | None) -> None:
        """The step (None: stop) to the other ranks."""
        self.comm.broadcast_ints(self._encoder.encode(step))

    def dead_rank(self, wait: float = 0.0) -> str | None:
        """Why the ranks cannot go on ("rank 1 exited unexpectedly ..."), or None while all live.

        A collective usually fails on rank 0 a moment before the dead process is reaped, hence ``wait``."""
        deadline = time.monotonic() + wait
        while True:
            for rank, w in enumerate(self.workers, start=1):
                if w.exitcode:  # 0: a clean exit after a reported load error
                    return f"rank {rank} exited unexpectedly (exit code {w.exitcode})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _watch(self) -> None:
        """A rank that dies leaves the others blocked in a collective forever: end the run, loudly."""
        while not self._closing:
            dead = self.dead_rank()
            if dead and not self._closing:
                self._closing = True  # close() must not wait on a collective the dead rank never joins
                self.on_rank_death(f"{dead}; the other ranks cannot continue, stopping")
                return
            time.sleep(0.2)

    def close(self) -> None:
        if self.dead_rank():
            self._closing = True
            for w in self.workers:  # the living ranks are stuck in a collective: end them
                w.kill()
            self.workers = []
        self._closing = True
        atexit.unregister(self.close)
        if getattr(self, "comm", None) is not None and self.comm.world > 1 and dist.is_initialized() and self.workers:
            self._send(None)
            for w in self.workers:
                w.join(timeout=30)
            dist.destroy_process_group()
        self.workers = []


def _worker_main(spec: RunnerSpec, rank: int, tp: int, port: int, die_with_parent: bool) -> None:
    _follow_rank0(die_with_parent)
    comm = init_process_group(rank, tp, port, torch.device(spec.device))
    runner, error = _load(spec, rank, comm)
    if not _load_errors(comm, error):
        runner.init_cache(comm)
        decoder = StepDecoder()
        while (step := decoder.decode(comm.broadcast_ints(None))) is not None:
            runner.execute(step)
    dist.destroy_process_group()


def _follow_rank0(die_with_parent: bool) -> None:
    """Rank 0 alone decides when a rank stops: a Ctrl-C sent to the whole process group, or systemd's
    SIGTERM to every process of the unit, must not kill ranks under a draining server. If rank 0 dies
    outright, the kernel ends this rank too (Linux), instead of leaving it blocked in a collective."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if die_with_parent and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _load(spec: RunnerSpec, rank: int, comm: Comm) -> tuple[ModelRunner | None, str | None]:
    try:
        return ModelRunner(spec, rank, comm), None
    except TpDeployError as e:
        return None, str(e)
    except Exception:  # report any failure to rank 0 instead of hanging the others
        return None, traceback.format_exc(limit=3)


def _load_errors(comm: Comm, error: str | None) -> list[tuple[int, str]]:
    """Every rank's load error, on every rank, so all of them stop together or go on together."""
    errors = [error]
    if comm.world > 1:
        errors = [None] * comm.world
        dist.all_gather_object(errors, error)
    return [(r, e) for r, e in enumerate(errors) if e]


def _raise_load_errors(comm: Comm, error: str | None) -> None:
    failed = _load_errors(comm, error)
    if failed:
        if comm.world > 1:
            dist.destroy_process_group()
        raise TpDeployError("; ".join(f"rank {r} failed to load: {e}" for r, e in failed))


def _check_devices(device: str, tp: int) -> None:
    if device != "cuda":
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < tp:
        raise TpDeployError(f"this workspace has tp={tp} ranks but {visible} CUDA device(s) are visible; "
                            f"run on {tp} GPUs (check CUDA_VISIBLE_DEVICES), re-convert with a smaller --tp, "
                            "or pass --device cpu")
