"""Serving throughput and latency of ``tprun serve`` under concurrent load, beside transformers, same run.

- baseline: transformers ``generate`` (fp32, greedy, exactly N new tokens) run sequentially, batch 1,
  over the same prompts in a child process, before the server starts (the two never share the cores);
  torch uses as many threads as the server's ranks together (cores // tp each);
- server: ``tprun serve`` (``--device cpu``, ``--max-model-len 1024``) on a workspace converted in this
  run; a loopback load generator (asyncio + httpx) streams ``/v1/completions`` (SSE, temperature 0,
  ``ignore_eos``, ``max_tokens`` N) for each concurrency level, keeping at most C requests in flight,
  after one warm-up request.
Per level: output tokens/s (generated tokens / wall time of the level), time to first token (first SSE
chunk with text) and inter-token latency (gaps between text chunks). Ratios are against the baseline's
tokens/s. The issue's CPU target, >= 4x at concurrency 32, is printed, never asserted: not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MODEL = "SmolLM2-135M-Instruct (fp32)"
MAX_MODEL_LEN = 1024
LEVELS, QUICK_LEVELS = (1, 8, 32), (1, 4)
REQUESTS, QUICK_REQUESTS = 32, 4
MAX_TOKENS, QUICK_MAX_TOKENS = 64, 8
TARGET_RATIO, TARGET_LEVEL = 4.0, 32  # the CPU target: tokens/s at concurrency 32 vs transformers b1
SUBJECTS = ["the ocean", "a lighthouse", "the moon", "bread", "a violin", "the city of Paris", "volcanoes",
            "honey bees", "the printing press", "a mountain village", "winter", "electric trains"]
TEMPLATES = ["Write a short story about {}.", "Here are three facts about {}:", "Explain to a child what {} is.",
             "A poem about {}:", "The history of {} began"]


def make_prompts(n: int) -> list[str]:
    """``n`` distinct, deterministic English prompts (template-major, so neighbours differ in shape)."""
    all_prompts = [t.format(s) for s in SUBJECTS for t in TEMPLATES]
    if not 1 <= n <= len(all_prompts):
        raise SystemExit(f"bench_serve: --requests {n} is out of range; allowed: 1..{len(all_prompts)}")
    return all_prompts[:n]


def child_hf(src: str, n_requests: int, max_tokens: int, threads: int) -> dict:
    """transformers ``generate``, one prompt at a time; tokens/s over the whole sequence of prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    prompts = make_prompts(n_requests)
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    generated = 0
    with torch.no_grad():
        model.generate(**tok(prompts[0], return_tensors="pt"), **kw)  # warm-up
        t = time.perf_counter()
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            generated += model.generate(**enc, **kw).shape[1] - enc.input_ids.shape[1]
        wall = time.perf_counter() - t
    return {"tokens": generated, "wall_s": wall, "tok_s": generated / wall, "threads": torch.get_num_threads()}


def _run_hf_child(src: Path, n_requests: int, max_tokens: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "tests.bench.bench_serve", "--child-hf", str(src), "--requests", str(n_requests),
           "--max-tokens", str(max_tokens), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"transformers baseline failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Sample:
    """One streamed request: seconds to the first text chunk, gaps between text chunks, tokens generated."""
    ttft: float
    itls: list[float]
    tokens: int


async def stream_one(client, url: str, prompt: str, max_tokens: int) -> Sample:
    """POST one streaming completion and time its SSE chunks as they arrive."""
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
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


async def run_level(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Every prompt once, at most ``concurrency`` in flight; wall time from first send to last byte."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def bounded(prompt: str) -> Sample:
            async with gate:
                return await stream_one(client, url, prompt, max_tokens)

        t = time.perf_counter()
        samples = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - t
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


def serve_levels(ws: Path, tp: int, kv_dtype: str, prompts: list[str], max_tokens: int,
                 levels: tuple[int, ...]) -> list[dict]:
    """Start the server, warm it up with one request, then run each concurrency level."""
    from tests.e2e.server import Server

    server = Server(ws, "--kv-dtype", kv_dtype, "--max-model-len", str(MAX_MODEL_LEN))
    try:
        asyncio.run(run_level(server.url, prompts[:1], max_tokens, 1))  # warm-up
        rows = []
        for c in levels:
            server.wait_idle()
            rows.append(asyncio.run(run_level(server.url, prompts, max_tokens, c)))
            print(f"bench_serve: tp {tp} concurrency {c}: {rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
        return rows
    except Exception:
        print(f"bench_serve: tprun serve log:\n{server.close()[-4000:]}", file=sys.stderr)
        raise
    finally:
        server.close()


def machine() -> dict:
    """CPU model (first 'model name' in /proc/cpuinfo) and the cores this process may use."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the served workspace")
    ap.add_argument("--requests", type=int, default=None, help=f"requests per level (default {REQUESTS})")
    ap.add_argument("--max-tokens", type=int, default=None, help=f"tokens generated per request (default {MAX_TOKENS})")
    ap.add_argument("--kv-dtype", default="auto", help="passed to tprun serve --kv-dtype")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_REQUESTS} requests x {QUICK_MAX_TOKENS} "
                    f"tokens, concurrency {', '.join(map(str, QUICK_LEVELS))}")
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    ap.add_argument("--json", type=Path, help="also write the settings, baseline and rows as JSON here")
    ap.add_argument("--child-hf", metavar="SRC", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_requests = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS)
    max_tokens = args.max_tokens or (QUICK_MAX_TOKENS if args.quick else MAX_TOKENS)
    if args.child_hf:
        print(json.dumps(child_hf(args.child_hf, n_requests, max_tokens, args.threads)))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the server
    prompts = make_prompts(n_requests)
    levels = QUICK_LEVELS if args.quick else LEVELS
    result = measure(args.tp, args.kv_dtype, prompts, max_tokens, levels)
    _report(result, args.markdown, args.json)


def measure(tp: int, kv_dtype: str, prompts: list[str], max_tokens: int, levels: tuple[int, ...]) -> dict:
    """Convert, run the transformers baseline, then the server levels; one dict with everything."""
    from converter.convert import ConvertOptions, convert
    from tests.fixtures.smollm2 import smollm2_path

    src = smollm2_path()
    info = machine()
    threads = max(1, (os.cpu_count() or 1) // tp) * tp  # what the server's ranks use together
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ws = Path(tmp) / f"tp{tp}"
        convert(ConvertOptions(src, ws, tp))
        baseline = _run_hf_child(src, len(prompts), max_tokens, threads)
        print(f"bench_serve: transformers sequential: {baseline['tok_s']:.1f} tok/s", file=sys.stderr)
        rows = serve_levels(ws, tp, kv_dtype, prompts, max_tokens, levels)
    for r in rows:
        r["ratio"] = r["tok_s"] / baseline["tok_s"]
    return {"machine": info, "model": MODEL, "tp": tp, "kv_dtype": kv_dtype, "max_tokens": max_tokens,
            "max_model_len": MAX_MODEL_LEN, "requests": len(prompts), "baseline": baseline, "rows": rows}


def _report(res: dict, markdown: Path | None, json_path: Path | None) -> None:
    m, base = res["machine"], res["baseline"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores. Model: {res['model']}. tprun serve tp {res['tp']}, "
             f"kv dtype {res['kv_dtype']}, max_tokens {res['max_tokens']} (ignore_eos), "
             f"max-model-len {res['max_model_len']}; baseline: transformers generate, sequential batch 1, "
             f"{base['threads']} torch threads.", "",
             "| concurrency | requests | output tok/s | ratio vs transformers seq. | TTFT median (s) | "
             "TTFT p90 (s) | ITL median (ms) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| transformers seq. | {res['requests']} | {base['tok_s']:.1f} | 1.00× | – | – | – |"]
    for r in res["rows"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | {r['ratio']:.2f}× | "
                     f"{r['ttft_median_s']:.2f} | {r['ttft_p90_s']:.2f} | {r['itl_median_ms']:.1f} |")
    target = next((r for r in res["rows"] if r["concurrency"] == TARGET_LEVEL), None)
    lines += ["", f"Target (issue, CPU): >= {TARGET_RATIO:g}× transformers tok/s at concurrency {TARGET_LEVEL}: "
              + (f"measured {target['ratio']:.2f}×." if target else f"not measured (no concurrency {TARGET_LEVEL}).")]
    print("\n".join(lines))
    if markdown:
        markdown.write_text("\n".join(lines) + "\n")
    if json_path:
        json_path.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
