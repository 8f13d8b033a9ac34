"""int4 weights on CPU against the dense model, same machine, same run (issue: int4 at least as fast as dense).

A script, not a test: ``.venv/bin/python -m tests.bench.bench_cpu_int4`` (part of ``make bench-generate``).
SmolLM2 at tp 1: the fp32 dense workspace, and the AutoAWQ (group 64) workspace under each ``--cpu-int4``
path; each in a fresh process: load seconds, peak RSS, and decode tokens/s at batch 1 and 8 (64 greedy
tokens after a warm-up). Prints ratios against dense fp32.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at", "In 1492, Columbus", "A good recipe for bread",
           "The theory of relativity says"]
NEW_TOKENS = 64
RUNS = [  # label, workspace kind, dtype, --cpu-int4
    ("dense fp32", "dense", "float32", "auto"),
    ("int4 packed (bf16 activations)", "awq", "bfloat16", "packed"),
    ("int4 dequant-once fp32", "awq", "float32", "dequant-once"),
    ("int4 per-call dequantize (v0.1)", "awq", "float32", "reference"),
]


def child(ws: str, dtype: str, mode: str, batches: str) -> dict:
    import psutil

    from runtime.api import LLM
    from runtime.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    with LLM(ws, device="cpu", dtype=dtype, cpu_int4=mode) as llm:
        result = {"load_s": time.perf_counter() - t0}
        llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))
        for batch in map(int, batches.split(",")):
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
            t = time.perf_counter()
            out = llm.generate(PROMPTS[:batch], params)
            result[f"tok_s_b{batch}"] = sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t)
        result["rss_mb"] = psutil.Process().memory_info().rss / 1e6
    return result


def workspaces() -> dict[str, Path]:
    from converter.convert import ConvertOptions, convert
    from tests.fixtures.quantized import awq_smollm2_path
    from tests.fixtures.smollm2 import smollm2_path

    out = {}
    for kind, src in (("dense", smollm2_path()), ("awq", awq_smollm2_path())):
        ws = src.parent / f"{src.name}-ws-tp1"
        if not (ws / "manifest.json").exists():
            convert(ConvertOptions(src, ws, 1))
        out[kind] = ws
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    ws = workspaces()
    rows = []
    for label, kind, dtype, mode in RUNS:
        batches = "1" if mode == "reference" else "1,8"  # the per-call path is too slow for more
        out = subprocess.run([sys.executable, "-m", "tests.bench.bench_cpu_int4", "--child", str(ws[kind]), dtype,
                              mode, batches], capture_output=True, text=True, check=True)
        rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[0][1]
    print(f"| SmolLM2 tp 1, {NEW_TOKENS} tokens | load s | RSS MB | tok/s b1 | vs dense | tok/s b8 | vs dense |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows:
        b8 = r.get("tok_s_b8")
        b8_cells = ("", "") if b8 is None else (f"{b8:.1f}", f"{b8 / base['tok_s_b8']:.2f}x")
        print(f"| {label} | {r['load_s']:.2f} | {r['rss_mb']:.0f} | {r['tok_s_b1']:.2f} | "
              f"{r['tok_s_b1'] / base['tok_s_b1']:.2f}x | {b8_cells[0]} | {b8_cells[1]} |")


if __name__ == "__main__":
    main()
