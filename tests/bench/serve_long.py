"""Long outputs on ``tprun serve``: is the time per token flat over 2,048 generated tokens?

LONG_REQUESTS requests at once (ignore_eos, ``max_tokens`` LONG_TOKENS, ``--max-model-len`` LONG_MODEL_LEN),
after one short warm-up. The host-side gap before each streamed text chunk is assigned to that chunk's
position in the output and the gaps are bucketed by position (tokens 1-256, 257-512, ...); the report
gives each bucket's median and the ratio last bucket / first bucket. Constant per-token work (incremental
detokenization, no O(output) step) shows as a ratio near 1.

Reading the ratio: the attention of a decode step reads the sequence's whole KV cache, which grows with
the output, so even a perfect engine slows a little. ``memory_bound_ratio`` is that floor for a decode
step that only streams bytes: (weights + KV of every sequence at the last bucket's middle) /
(the same at the first bucket's middle). A ratio well above it means per-token work that grows.

``measure_host`` separates the two in process (same workspace, prompts and lengths, ``LLM``): each engine
step's wall time, the model's forward within it, and the rest (scheduling, step descriptors outside the
forward, sampling, detokenization, stops: the host's per-token work), bucketed by output position.
"""
from __future__ import annotations

import json
import statistics
import struct
import time
from pathlib import Path

from tests.bench.loadgen import make_prompts, run_requests

LONG_REQUESTS, LONG_TOKENS, BUCKET = 4, 2048, 256
QUICK_LONG_TOKENS, QUICK_BUCKET = 64, 8
LONG_MODEL_LEN = 4096
FP32_BYTES = 4  # tprun's CPU compute dtype for this checkpoint, and so its weights and KV (kv dtype auto)


def bucket_medians(gap_lists: list[list[float]], tokens: int, bucket: int) -> list[dict]:
    """``gap_lists[r][j]`` is the gap before text chunk j + 2 of request r (chunk 1 is the TTFT), so
    the gap before chunk ``c`` goes to bucket ``(c - 1) // bucket``; each bucket: median ms and count."""
    buckets: list[list[float]] = [[] for _ in range(tokens // bucket)]
    for gaps in gap_lists:
        for j, g in enumerate(gaps):
            b = (j + 1) // bucket
            if b < len(buckets):
                buckets[b].append(g)
    return [{"first": i * bucket + 1, "last": (i + 1) * bucket, "gaps": len(b),
             "itl_median_ms": 1000 * statistics.median(b) if b else float("nan")} for i, b in enumerate(buckets)]


def weight_bytes(src: Path) -> int:
    """Parameters of the HF checkpoint (from the safetensors headers) at FP32_BYTES each."""
    total = 0
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                total += n
    return total * FP32_BYTES


def kv_bytes_per_token(src: Path) -> int:
    """K and V of every layer for one token at FP32_BYTES, from config.json."""
    cfg = json.loads((src / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * FP32_BYTES


def memory_bound_ratio(src: Path, prompt_tokens: int, tokens: int, bucket: int, requests: int) -> float:
    w, kv = weight_bytes(src), kv_bytes_per_token(src)
    first, last = prompt_tokens + bucket // 2, prompt_tokens + tokens - bucket // 2
    return (w + requests * kv * last) / (w + requests * kv * first)


def measure_long(start_server, src: Path, quick: bool) -> dict:
    """``start_server(max_model_len, kv_tokens)`` gives a started ServedProcess; this runs the long
    requests on it, closes it, and returns the buckets."""
    tokens, bucket = (QUICK_LONG_TOKENS, QUICK_BUCKET) if quick else (LONG_TOKENS, BUCKET)
    prompts = make_prompts(LONG_REQUESTS)
    server = start_server(LONG_MODEL_LEN, LONG_REQUESTS * LONG_MODEL_LEN)
    try:
        run_requests(server.url, prompts[:1], 8, 1)  # warm-up
        samples, wall = run_requests(server.url, prompts, tokens, LONG_REQUESTS)
    finally:
        server.close()
    buckets = bucket_medians([s.itls for s in samples], tokens, bucket)
    generated = sum(s.tokens for s in samples)
    prompt_tokens = 16  # the prompts are one short sentence; only the floor estimate uses this
    return {"requests": LONG_REQUESTS, "max_tokens": tokens, "bucket": bucket, "max_model_len": LONG_MODEL_LEN,
            "tokens": generated, "chunks": sum(len(s.itls) + 1 for s in samples), "wall_s": wall,
            "tok_s": generated / wall, "buckets": buckets,
            "ratio_last_first": buckets[-1]["itl_median_ms"] / buckets[0]["itl_median_ms"],
            "memory_bound_ratio": memory_bound_ratio(src, prompt_tokens, tokens, bucket, LONG_REQUESTS),
            "startup_s": server.startup_s, "peak_rss_gib": server.peak_rss / (1 << 30)}


def measure_host(ws: Path, kv_dtype: str, quick: bool) -> dict:
    """The long requests in process: per bucket of steps, the median step, forward and host (step - forward)
    milliseconds; the engine decodes every sequence once per step, so step j makes output token j + 1."""
    from runtime.api import LLM
    from runtime.engine.sampling import SamplingParams

    tokens, bucket = (QUICK_LONG_TOKENS, QUICK_BUCKET) if quick else (LONG_TOKENS, BUCKET)
    steps: list[tuple[float, float]] = []
    with LLM(ws, device="cpu", max_model_len=LONG_MODEL_LEN, kv_dtype=kv_dtype) as llm:
        llm.generate(make_prompts(1), SamplingParams(temperature=0, max_tokens=8))  # warm-up
        model, engine = llm.driver.runner.model, llm.engine
        forward, step, spent = model.forward, engine.step, [0.0]

        def timed_forward(*a, **kw):
            t = time.perf_counter()
            try:
                return forward(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t

        def timed_step():
            spent[0], t = 0.0, time.perf_counter()
            out = step()
            steps.append((time.perf_counter() - t, spent[0]))
            return out
        model.forward, engine.step = timed_forward, timed_step
        try:
            llm.generate(make_prompts(LONG_REQUESTS), SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        finally:
            del model.forward, engine.step
    rows = []
    for i in range(tokens // bucket):
        part = steps[1 + i * bucket: 1 + (i + 1) * bucket]  # step 0 is the prompts' prefill
        if part:
            rows.append({"first": i * bucket + 1, "last": i * bucket + len(part),
                         "step_ms": 1000 * statistics.median(a for a, _ in part),
                         "forward_ms": 1000 * statistics.median(f for _, f in part),
                         "host_ms": 1000 * statistics.median(a - f for a, f in part)})
    return {"requests": LONG_REQUESTS, "max_tokens": tokens, "bucket": bucket, "buckets": rows,
            "host_ratio_last_first": rows[-1]["host_ms"] / rows[0]["host_ms"],
            "forward_ratio_last_first": rows[-1]["forward_ms"] / rows[0]["forward_ms"]}


def report_host(res: dict) -> list[str]:
    lines = [f"The same {res['requests']} requests in process (`LLM`), per engine step (one token of every sequence), "
             "medians per bucket:", "",
             "| output tokens | step (ms) | model forward (ms) | host: step − forward (ms) | host per token (ms) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {b['first']}–{b['last']} | {b['step_ms']:.1f} | {b['forward_ms']:.1f} | {b['host_ms']:.2f} | "
              f"{b['host_ms'] / res['requests']:.3f} |" for b in res["buckets"]]
    lines += ["", f"Host time last bucket / first: {res['host_ratio_last_first']:.2f}×; model forward: "
              f"{res['forward_ratio_last_first']:.2f}×."]
    return lines


def report_long(res: dict, m: dict) -> list[str]:
    lines = [f"Long outputs on {m['cpu']}, {m['cores']} cores (tprun serve, max-model-len {res['max_model_len']}): "
             f"{res['requests']} requests at "
             f"concurrency {res['requests']}, {res['max_tokens']} tokens each (ignore_eos); {res['tokens']} tokens "
             f"in {res['chunks']} text chunks, {res['tok_s']:.1f} tok/s.", "",
             "| output tokens | ITL median (ms) | gaps |", "| ---: | ---: | ---: |"]
    lines += [f"| {b['first']}–{b['last']} | {b['itl_median_ms']:.1f} | {b['gaps']} |" for b in res["buckets"]]
    lines += ["", f"Last bucket / first bucket: {res['ratio_last_first']:.2f}× (target: flat, ≈1; a decode step "
              f"that only streams weights and KV would give {res['memory_bound_ratio']:.2f}×)."]
    return lines
