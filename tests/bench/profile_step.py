"""Where one batched decode step's host time goes on CPU (SmolLM2-135M, 32 greedy requests of 64 tokens).

A script, not a test: ``.venv/bin/python -m tests.bench.profile_step [--reps 3] [--tokens out.json]``.
It wraps the pieces of ``Engine.step`` in ``perf_counter`` timers and prints, for decode-only steps,
the median over repetitions of the mean ms per step of each piece and its share of the step. Nested
pieces are indented under their parent; "other" is the parent's time its listed children do not cover.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams

WORKSPACE = Path(tempfile.gettempdir()) / "tpdeploy-profile-smollm2-fp32"
# parent -> children, in print order (names are the labels given to ``_timed``)
TREE = {
    "step": ["schedule", "execute", "sample", "advance"],
    "execute": ["broadcast", "runner"],
    "runner": ["forward"],
    "forward": ["prepare", "attention", "mlp", "lm_head+gather"],
    "attention": ["attend"],
    "attend": ["write_kv", "decode_attention"],
}


class Timers:
    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, fn, label: str):
        def timed(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.total[label] += time.perf_counter() - t
        return timed


def _instrument(llm: LLM, timers: Timers) -> None:
    eng, drv = llm.engine, llm.driver
    runner, model, cache = drv.runner, drv.runner.model, drv.runner.cache
    eng.scheduler.schedule = timers.wrap(eng.scheduler.schedule, "schedule")
    eng.sampler.sample = timers.wrap(eng.sampler.sample, "sample")
    eng._advance = timers.wrap(eng._advance, "advance")
    drv.execute = timers.wrap(drv.execute, "execute")
    if hasattr(drv, "_send"):  # the step message to the other ranks (none at tp 1)
        drv._send = timers.wrap(drv._send, "broadcast")
    else:  # v0.1: the pickled Step (a no-op at tp 1)
        drv.comm.broadcast_object = timers.wrap(drv.comm.broadcast_object, "broadcast")
    runner.execute = timers.wrap(runner.execute, "runner")
    model.forward = timers.wrap(model.forward, "forward")
    model._attention = timers.wrap(model._attention, "attention")
    model._mlp = timers.wrap(model._mlp, "mlp")
    model.comm.gather_last_dim = timers.wrap(model.comm.gather_last_dim, "lm_head+gather")
    cache.prepare = timers.wrap(cache.prepare, "prepare")
    cache.attend = timers.wrap(cache.attend, "attend")
    k = cache.kernels
    cache.kernels = dataclasses.replace(k, write_kv=timers.wrap(k.write_kv, "write_kv"),
                                        decode_attention=timers.wrap(k.decode_attention, "decode_attention"))


def _workspace(src: Path) -> Path:
    if not (WORKSPACE / "manifest.json").exists():
        convert(ConvertOptions(src, WORKSPACE, 1, dtype="float32"))
    return WORKSPACE


def _run(llm: LLM, timers: Timers, prompts: list[str], params: SamplingParams) -> tuple[dict, int, list]:
    """One generate; per-piece seconds summed over decode-only steps, and how many there were."""
    eng = llm.engine
    step = eng.step
    decode_steps = 0

    def measured(*a, **kw):
        nonlocal decode_steps
        decode = all(s.computed == len(s.tokens) - 1 for s in eng.scheduler.running) and not eng.scheduler.waiting
        timers.on = decode
        t = time.perf_counter()
        try:
            return step(*a, **kw)
        finally:
            if decode:
                timers.total["step"] += time.perf_counter() - t
                decode_steps += 1
            timers.on = False

    eng.step = measured
    timers.total.clear()
    out = llm.generate(prompts, params)
    eng.step = step
    return dict(timers.total), decode_steps, [o.outputs[0].token_ids for o in out]


def _print(reps: list[dict]) -> None:
    med = {k: statistics.median(r.get(k, 0.0) for r in reps) for k in reps[0]}
    step = med["step"]

    def show(label: str, depth: int) -> None:
        if label not in med:
            return
        print(f"{'  ' * depth}{label:<{24 - 2 * depth}} {med[label]:8.2f} ms {100 * med[label] / step:5.1f} %")
        kids = [k for k in TREE.get(label, []) if k in med]
        for k in kids:
            show(k, depth + 1)
        if kids:
            rest = med[label] - sum(med[k] for k in kids)
            print(f"{'  ' * (depth + 1)}{'other':<{22 - 2 * depth}} {rest:8.2f} ms {100 * rest / step:5.1f} %")
    show("step", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=Path, help="write the greedy tokens here (JSON) to compare runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: what the runner picks)")
    args = ap.parse_args()
    from tests.fixtures.smollm2 import smollm2_path

    ws = _workspace(smollm2_path())
    prompts = [f"Write a short story about the number {i} and a {w}." for i, w in
               zip(range(args.batch), ["cat", "ship", "tree", "robot"] * args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    timers = Timers()
    with LLM(ws, device="cpu") as llm:
        if args.threads:
            torch.set_num_threads(args.threads)
        _instrument(llm, timers)
        _run(llm, timers, prompts[:4], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        reps, tokens = [], None
        for _ in range(args.reps):
            total, n, tokens = _run(llm, timers, prompts, params)
            reps.append({k: 1e3 * v / n for k, v in total.items()})
    print(f"decode steps of {args.batch} sequences, mean ms per step, median of {args.reps} runs "
          f"({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}):")
    _print(reps)
    print("per run step ms:", [round(r["step"], 2) for r in reps])
    if args.tokens:
        args.tokens.write_text(json.dumps(tokens))


if __name__ == "__main__":
    main()
