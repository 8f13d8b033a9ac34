"""What a JSON schema costs: tokens/s of 8 concurrent requests with and without one, same engine, same run.

SmolLM2 (tp 1, CPU) through ``LLM.generate`` — the engine the server drives, batching the 8 requests as
it batches 8 concurrent clients; the HTTP layer is the same with or without a grammar, so it is left out.
Chat prompts, temperature 0, 64 tokens each with ``ignore_eos`` and a schema long enough (at least 30
list items) that no constrained answer ends early: both runs hold 8 sequences for the same 64 steps.
The runs alternate ``--reps`` times after a warm-up (xgrammar's import and the schema's compilation are
once per server, not per request); tokens/s = generated tokens / wall time, median.
A script, not a test: ``python -m tests.bench.bench_structured [--markdown PATH]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from tests.bench.loadgen import make_prompts

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "items": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 30, "maxItems": 40}},
    "required": ["title", "items"]}
CONCURRENCY, MAX_TOKENS = 8, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    from runtime.api import LLM
    from runtime.engine.sampling import SamplingParams
    from tests.bench.bench_cpu_int4 import workspaces

    with LLM(workspaces()["dense"], device="cpu") as llm:
        prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": f"{p} Answer as a list."}])
                   for p in make_prompts(CONCURRENCY)]

        def run(schema: dict | None) -> float:
            params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, guided_json=schema)
            t0 = time.perf_counter()
            out = llm.generate(prompts, params)
            tokens = sum(len(o.outputs[0].token_ids) for o in out)
            assert tokens == CONCURRENCY * MAX_TOKENS, tokens
            return tokens / (time.perf_counter() - t0)

        run(SCHEMA), run(None)  # warm-up
        rates = {"plain": [], "json_schema": []}
        for _ in range(args.reps):
            rates["plain"].append(run(None))
            rates["json_schema"].append(run(SCHEMA))
    plain, schema = statistics.median(rates["plain"]), statistics.median(rates["json_schema"])
    lines = [f"| {CONCURRENCY} requests x {MAX_TOKENS} tokens, batched | tokens/s (median) | runs |", "|---|---:|---|"]
    lines += [f"| {k} | {statistics.median(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for k, v in rates.items()]
    # Each pair ran back to back, so its ratio shares the machine's load of that moment: the fairer figure.
    pairs = statistics.median(s / p for s, p in zip(rates["json_schema"], rates["plain"]))
    note = (f"json_schema / plain = {pairs:.2f} (median of the {args.reps} back-to-back pairs; of the medians "
            f"{schema / plain:.2f}); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end.")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
