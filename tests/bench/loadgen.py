"""A loopback load generator for OpenAI-compatible servers: streamed ``/v1/completions``, timed per chunk.

The same prompts, body and timing serve every server under test (``tprun serve`` and its peers), so
their numbers differ only by the server. Each request: temperature 0, ``ignore_eos``, ``max_tokens`` N,
SSE with ``include_usage`` (the generated-token count comes from the server's usage, not from chunks).
Times are host wall-clock at the client: TTFT is send -> first chunk with text; ITLs are the gaps
between successive chunks with text (a server that packs several tokens into one chunk shows fewer,
longer gaps).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

SERVED_MODEL_NAME = "smollm2"  # what every server under test is told to call the model
SUBJECTS = ["the ocean", "a lighthouse", "the moon", "bread", "a violin", "the city of Paris", "volcanoes",
            "honey bees", "the printing press", "a mountain village", "winter", "electric trains"]
TEMPLATES = ["Write a short story about {}.", "Here are three facts about {}:", "Explain to a child what {} is.",
             "A poem about {}:", "The history of {} began"]
HTTP_TIMEOUT_S = 1800.0  # one long-output request at low throughput on a busy CPU must not be cut


def make_prompts(n: int) -> list[str]:
    """``n`` distinct, deterministic English prompts (template-major, so neighbours differ in shape)."""
    all_prompts = [t.format(s) for s in SUBJECTS for t in TEMPLATES]
    if not 1 <= n <= len(all_prompts):
        raise SystemExit(f"bench_serve: --requests {n} is out of range; allowed: 1..{len(all_prompts)}")
    return all_prompts[:n]


@dataclass(frozen=True)
class Sample:
    """One streamed request: seconds to the first text chunk, gaps between text chunks, tokens generated."""
    ttft: float
    itls: list[float]
    tokens: int


async def stream_one(client, url: str, prompt: str, max_tokens: int) -> Sample:
    """POST one streaming completion and time its SSE chunks as they arrive."""
    body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    arrivals: list[float] = []
    tokens = None
    t0 = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code} from /v1/completions: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"in-band error from the server: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices") or []):
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError(f"no text chunk streamed for prompt {prompt!r}")
    return Sample(arrivals[0] - t0, [b - a for a, b in zip(arrivals, arrivals[1:])],
                  max_tokens if tokens is None else tokens)


async def _run(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[list[Sample], float]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(HTTP_TIMEOUT_S), limits=limits) as client:
        async def bounded(prompt: str) -> Sample:
            async with gate:
                return await stream_one(client, url, prompt, max_tokens)

        t = time.perf_counter()
        samples = await asyncio.gather(*(bounded(p) for p in prompts))
        return list(samples), time.perf_counter() - t


def run_requests(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[list[Sample], float]:
    """Every prompt once, at most ``concurrency`` in flight; the samples and the wall time from first
    send to last byte."""
    return asyncio.run(_run(url, prompts, max_tokens, concurrency))


def run_level(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """One concurrency level, summarised: output tokens/s, TTFT median and p90, ITL median."""
    samples, wall = run_requests(url, prompts, max_tokens, concurrency)
    tokens = sum(s.tokens for s in samples)
    ttfts, itls = [s.ttft for s in samples], [g for s in samples for g in s.itls]
    return {"concurrency": concurrency, "requests": len(samples), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_median_s": statistics.median(ttfts), "ttft_p90_s": percentile(ttfts, 90),
            "itl_median_ms": 1000 * statistics.median(itls) if itls else float("nan")}


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)
