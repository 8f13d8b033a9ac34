"""What a JSON schema costs a serving request: tokens/s at concurrency 8 with and without one, same server.

``tprun serve`` of SmolLM2 (tp 1, CPU); 16 chat requests, 8 at a time, temperature 0, ``max_tokens`` 64,
once plain and once with a ``json_schema`` response format (a list of up to 40 short strings, so the
constrained answers run about as long as the plain ones), alternating the two runs ``--reps`` times.
Generated tokens come from the server's usage; tokens/s = all generated tokens / wall time. The first
constrained request compiles the schema (and imports xgrammar) before timing starts. A script, not a test:
``python -m tests.bench.bench_structured [--markdown PATH]``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import time
from pathlib import Path

import openai

from tests.bench.loadgen import make_prompts
from tests.e2e.server import Server

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "items": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 40}},
    "required": ["title", "items"]}
REQUESTS, CONCURRENCY, MAX_TOKENS = 16, 8, 64


def run(client: openai.OpenAI, prompts: list[str], constrained: bool) -> tuple[float, int]:
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "list", "schema": SCHEMA}}} \
        if constrained else {}

    def one(prompt: str) -> int:
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=MAX_TOKENS, temperature=0, **extra)
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        tokens = sum(pool.map(one, prompts))
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    from tests.bench.bench_cpu_int4 import workspaces

    server = Server(workspaces()["dense"])
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
        prompts = [f"{p} Answer as a list." for p in make_prompts(REQUESTS)]
        run(client, prompts[:1], True)  # warm-up: xgrammar import and the schema's compilation
        run(client, prompts[:1], False)
        rates = {False: [], True: []}
        for _ in range(args.reps):
            for constrained in (False, True):
                wall, tokens = run(client, prompts, constrained)
                rates[constrained].append((tokens / wall, tokens))
    finally:
        server.close()
    plain, schema = (statistics.median(r for r, _ in rates[k]) for k in (False, True))
    rows = [("plain", plain, rates[False]), ("json_schema", schema, rates[True])]
    lines = ["| requests (c=8, 16 total, max_tokens 64) | tokens/s (median) | tokens generated per run |",
             "|---|---:|---:|"]
    lines += [f"| {name} | {rate:.1f} | {', '.join(str(t) for _, t in runs)} |" for name, rate, runs in rows]
    note = (f"json_schema / plain = {schema / plain:.2f} ({args.reps} alternating runs each, median); "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end.")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
