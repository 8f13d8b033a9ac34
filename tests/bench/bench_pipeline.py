"""Pipeline parallelism on CPU processes: batches in flight against one batch at a time.

A script, not a test: ``.venv/bin/python -m tests.bench.bench_pipeline [--pp 2] [--requests 32] [--reps 3]``
(``make bench-pipeline``). SmolLM2 converted with ``--pp P`` (tp 1, one process per stage, the host's
cores split between them); 32 greedy requests of 64 new tokens at once through the offline API, so
the engine batches all of them. Alternating repetitions of ``--pipeline-batches 1`` (naive: a stage
waits while the other works) and ``P`` (the default); prints the median tokens/s of each and the ratio,
and the same at pp 1 as the baseline without stages.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams
from tests.fixtures.smollm2 import smollm2_path

PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how a bicycle stays upright.",
           "List five uses of copper.", "What is the difference between weather and climate?"]


def workspace(pp: int) -> Path:
    src = smollm2_path()
    ws = src.parent / f"{src.name}-ws-pp{pp}"
    if not (ws / "manifest.json").exists():
        convert(ConvertOptions(src, ws, 1, pp=pp))
    return ws


def run(ws: Path, batches: int, requests: int, new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(requests)]
    with LLM(ws, device="cpu", pipeline_batches=batches, kv_cache_tokens=65536) as llm:
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm up every rank
        t = time.perf_counter()
        out = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in out) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    ws, ws1 = workspace(args.pp), workspace(1)
    results: dict[str, list[float]] = {"pp1": [], "naive": [], "in flight": []}
    for _ in range(args.reps):
        results["pp1"].append(run(ws1, 1, args.requests, args.new_tokens))
        results["naive"].append(run(ws, 1, args.requests, args.new_tokens))
        results["in flight"].append(run(ws, args.pp, args.requests, args.new_tokens))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"| SmolLM2 fp32, {args.requests} requests x {args.new_tokens} tokens | tok/s (median of {args.reps}) | "
          "all runs |")
    print("| --- | ---: | --- |")
    print(f"| pp 1 (one process) | {med['pp1']:.1f} | {', '.join(f'{x:.1f}' for x in results['pp1'])} |")
    print(f"| pp {args.pp}, one batch at a time | {med['naive']:.1f} | "
          f"{', '.join(f'{x:.1f}' for x in results['naive'])} |")
    print(f"| pp {args.pp}, {args.pp} batches in flight | {med['in flight']:.1f} | "
          f"{', '.join(f'{x:.1f}' for x in results['in flight'])} |")
    print(f"\nin flight / naive: {med['in flight'] / med['naive']:.2f}x; in flight / pp 1: "
          f"{med['in flight'] / med['pp1']:.2f}x")


if __name__ == "__main__":
    main()
