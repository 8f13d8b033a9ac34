"""What sending each step to the other ranks costs at tp > 1 on CPU, with a tiny model so the host shows.

A script, not a test: ``.venv/bin/python -m tests.bench.profile_broadcast [--tp 2 3] [--reps 5] [--isolated]``.
32 greedy requests of 64 tokens; for decode-only steps it prints the median over repetitions of the
mean ms per step of ``Driver.execute`` (send + forward on every rank) and of rank 0's send alone.
``--isolated``: ranks that only pass steps (32 decoding sequences, a new block every 64 tokens), the
pickled Step (``broadcast_object_list``, what v0.1 sent) against the ``wire`` message, alternating.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.config import CacheConfig
from runtime.engine.sampling import SamplingParams

ROOT = Path(tempfile.gettempdir()) / "tpdeploy-profile-tiny"


def _workspace(tp: int) -> Path:
    from tests.fixtures.tiny import make_tiny

    src, ws = ROOT / "src", ROOT / f"tp{tp}"
    if not (src / "config.json").exists():
        make_tiny(src, "llama", heads=12, kv_heads=6, hidden=192, intermediate=384, vocab=301, seed=1)
    if not (ws / "manifest.json").exists():
        convert(ConvertOptions(src, ws, tp))
    return ws


def _measure(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
    """Mean ms per decode-only step of Driver.submit (at pp 1: the whole step) and of its send part."""
    drv = llm.driver
    send_name = "_send" if hasattr(drv, "_send") else None
    execute = drv.submit
    times = {"execute": 0.0, "send": 0.0}
    steps = 0
    original_send = getattr(drv, send_name) if send_name else drv.comm.broadcast_object

    def send(*a, **kw):
        t = time.perf_counter()
        try:
            return original_send(*a, **kw)
        finally:
            times["send"] += time.perf_counter() - t

    def timed(step):
        nonlocal steps
        if not step.batch.decode_only:
            return execute(step)
        t = time.perf_counter()
        try:
            return execute(step)
        finally:
            times["execute"] += time.perf_counter() - t
            steps += 1

    if send_name:
        setattr(drv, send_name, send)
    else:
        drv.comm.broadcast_object = send
    drv.submit = timed  # pp 1: submit runs the step everywhere and holds the logits
    try:
        llm.generate(prompts, params)
    finally:
        drv.submit = execute
        if send_name:
            setattr(drv, send_name, original_send)
        else:
            drv.comm.broadcast_object = original_send
    return 1e3 * times["execute"] / steps, 1e3 * times["send"] / steps


def _isolated_rank(rank: int, world: int, port: int, reps: int, batch: int, result) -> None:
    from runtime.kv.batch import SeqSlice, StepBatch
    from datetime import timedelta

    from runtime.worker.parallel import Rendezvous, Topology, init_process_group, open_store
    from runtime.worker.runner import Step
    from runtime.worker.wire import StepDecoder, StepEncoder

    torch.set_num_threads(1)
    store = open_store(Rendezvous("127.0.0.1", port, rank == 0), world, timedelta(seconds=60))
    comm = init_process_group(Topology(rank, world, 1, rank), store, torch.device("cpu"), timedelta(seconds=60))

    def seq(i: int, k: int) -> SeqSlice:  # sequence i's k-th decode step: a new 64-token block now and then
        context = 20 + i + k
        return SeqSlice(i, 1, context, tuple(range(100 * i, 100 * i + context // 64 + 1)))
    steps = [Step([5] * batch, StepBatch(tuple(seq(i, k) for i in range(batch)))) for k in range(256)]

    def pickled(step):
        box = [step if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    enc, dec = StepEncoder(), StepDecoder()

    def wire(step):
        message = comm.broadcast_ints(enc.encode(step) if rank == 0 else None)
        return step if rank == 0 else dec.decode(message)
    times = {"pickle": [], "wire": []}
    for _ in range(reps):
        for name, send in (("pickle", pickled), ("wire", wire)):
            dist.barrier()
            t = time.perf_counter()
            for step in steps:
                got = send(step)
            times[name].append(1e6 * (time.perf_counter() - t) / len(steps))
            assert got == steps[-1]
    if rank == 0:
        result.update({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()


def isolated(tps: list[int], reps: int, batch: int) -> None:
    from runtime.worker.parallel import free_port

    for tp in tps:
        with tmp.Manager() as m:
            result = m.dict()
            tmp.spawn(_isolated_rank, args=(tp, free_port(), reps, batch, result), nprocs=tp)
            print(f"tp {tp}: passing a decode step of {batch} seqs, rank 0: pickled Step {result['pickle']:.0f} us, "
                  f"wire message {result['wire']:.0f} us (median of {reps} x 256 steps; load {os.getloadavg()[0]:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--isolated", action="store_true", help="time only passing steps between ranks")
    args = ap.parse_args()
    if args.isolated:
        return isolated(args.tp, args.reps, args.batch)
    prompts = [list(range(3 + i, 3 + i + 5 + i % 7)) for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for tp in args.tp:
        with LLM(_workspace(tp), device="cpu", cache=CacheConfig(block_size=16, kv_cache_tokens=8192)) as llm:
            llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4))  # warm-up
            runs = [_measure(llm, prompts, params) for _ in range(args.reps)]
        ex, send = (statistics.median(r[i] for r in runs) for i in (0, 1))
        print(f"tp {tp}: decode step of {args.batch} seqs: Driver.execute {ex:.3f} ms, rank 0 send {send:.3f} ms "
              f"(median of {args.reps}; runs {[round(r[0], 2) for r in runs]}; {torch.get_num_threads()} threads, "
              f"load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
