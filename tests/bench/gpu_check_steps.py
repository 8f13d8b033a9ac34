"""The measuring steps of ``gpu_check``, each run in its own process: ``python -m tests.bench.gpu_check_steps
NAME CTX_JSON OUT_JSON``.

A step reads its settings from CTX_JSON (written by ``gpu_check``) and writes what it has measured
so far to OUT_JSON after every unit of work, so a step killed at its time limit still leaves its
finished rows behind. An error in one unit (one KV dtype, one memory scenario) is recorded under
``errors`` and the step goes on; the process exits 1 when any error was recorded.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

KV_DTYPES = ("fp16", "int8", "int4")
WARMUP_TOKENS = 4  # one short generate per batch size first: Triton compiles its kernels then, not in a timed run
COPY_REPEATS = 10  # timed device-to-device copies; the median is kept
# SmolLM2-135M-Instruct's shape (tests/fixtures/smollm2.EXPECTED_CONFIG): a random model of it times like the real one.
SMOLLM2_DIMS = {"num_layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "intermediate": 1536, "vocab": 49152,
                "tie": True, "rope_theta": 100000.0}
TINY_DIMS: dict[str, Any] = {}  # tests/fixtures/tiny.make_tiny's defaults: 2 layers, hidden 64, vocab 250
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three primary colors are", "Water boils at", "In 1492, Columbus", "A good recipe for bread",
    "The theory of relativity says", "The largest planet in the solar system is", "To install a Python package, run",
    "My favourite book is", "The stock market today", "Photosynthesis is the process by which",
    "SELECT name FROM users WHERE", "The quickest way to learn a language is", "Dear hiring manager,",
    "The history of the Roman Empire", "How to make a cup of tea:", "The best thing about summer is",
    "In machine learning, overfitting means", "The mitochondria is", "A haiku about the sea:",
    "The rules of chess are", "Yesterday I went to the market and", "The speed of light is",
    "import numpy as np\n", "The Great Wall of China was built", "Ten tips for better sleep:",
    "The difference between a virus and a bacterium is", "Breaking news:", "The moon orbits the Earth every",
    "Tensor parallelism splits each layer",
]


class Recorder:
    """The step's results as JSON, rewritten (atomically) after every change."""

    def __init__(self, path: Path):
        self.path, self.data = Path(path), {"errors": {}}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._flush()

    def add(self, key: str, *rows: dict) -> None:
        self.data.setdefault(key, []).extend(rows)
        self._flush()

    def error(self, key: str) -> None:
        """Record the exception being handled under ``key``."""
        self.data["errors"][key] = traceback.format_exc()
        print(f"gpu-check step error [{key}]:\n{self.data['errors'][key]}", file=sys.stderr, flush=True)
        self._flush()

    def _flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _sizes(ctx: dict) -> dict:
    return ctx["sizes"]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return f"unknown (nvidia-smi: {type(e).__name__})"


def device_facts(ctx: dict, rec: Recorder) -> None:
    """Step 1: what the figures were measured on."""
    import psutil
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "torch CUDA": str(torch.version.cuda),
             "triton": _version("triton"), "transformers": _version("transformers"), "CPU cores": os.cpu_count(),
             "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset")}
    if ctx["device"] == "cuda":
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        facts.update({"device": torch.cuda.get_device_name(0), "capability": f"sm_{p.major}{p.minor}",
                      "multiprocessors": p.multi_processor_count,
                      "L2 cache MiB": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                      "memory total GiB": round(total / 2**30, 2), "memory free GiB": round(free / 2**30, 2),
                      "driver": _driver()})
    else:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else None
        facts.update({"device": f"CPU ({cpu.group(1) if cpu else platform.processor()}), dry run",
                      "memory total GiB": round(psutil.virtual_memory().total / 2**30, 2), "driver": "n/a"})
    rec.put("facts", facts)


def prepare(ctx: dict, rec: Recorder) -> None:
    """The checkpoint (the real one, or a random model of its shape), its tp-1 workspace, the prompts' ids."""
    from converter.convert import ConvertOptions, convert
    from runtime.engine.tokenizer import Tokenizer

    work = Path(ctx["work"])
    src = Path(ctx["model"]) if ctx["model"] else _random_model(work / "random-src", ctx["random_dims"])
    rec.put("source", str(src))
    ws = work / "workspace"
    summary = convert(ConvertOptions(src, ws, 1, dtype=ctx["dtype"], force=True))
    tok = Tokenizer.from_workspace(ws)
    prompts = [tok.encode(p) for p in PROMPTS]
    flat = [t for p in prompts for t in p]
    long_prompt = (flat * (_sizes(ctx)["max_prefill_tokens"] // len(flat) + 1))[:_sizes(ctx)["max_prefill_tokens"]]
    rec.put("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else 0)
    rec.put("prompts", prompts)
    rec.put("long_prompt", long_prompt)
    rec.put("convert_s", summary.seconds)
    rec.put("workspace", str(ws))


def _random_model(out: Path, dims: dict) -> Path:
    """A seeded random Llama of ``dims`` (make_tiny's arguments), when the real checkpoint is not on this machine."""
    from tests.fixtures.tiny import make_tiny

    return make_tiny(out, "llama", seed=1234, extra_config={"max_position_embeddings": 8192}, **dims)


def _timed_rows(run: Callable[[int, int], list[list[int]]], ctx: dict, engine: str, kv: str) -> list[dict]:
    """Decode speed at each batch size: tok/s over the whole generate, ms/step from (t_N - t_1) / (N - 1)."""
    s = _sizes(ctx)
    n, batches = s["new_tokens"], s["batches"]
    for b in (max(batches), 1):
        run(b, WARMUP_TOKENS)
    rows = []
    for b in batches:
        t = time.perf_counter()
        run(b, 1)  # prefill and the first token: subtracted to leave the decode steps
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        tokens = run(b, n)
        tn = time.perf_counter() - t
        rows.append({"engine": engine, "kv": kv, "batch": b, "new_tokens": n, "seconds": tn, "tok_s": b * n / tn,
                     "ms_step": 1e3 * (tn - t1) / max(1, n - 1), "prefill_s": t1,
                     "short_rows": sum(len(x) != n for x in tokens),
                     "tokens": tokens[:s["agree_prompts"]] if b == max(batches) else None})
    return rows


def decode_tprun(ctx: dict, rec: Recorder) -> None:
    """Step 4, tprun: LLM on the device with each KV dtype; greedy, ignore_eos."""
    from runtime.api import LLM
    from runtime.config import CacheConfig
    from runtime.engine.sampling import SamplingParams

    prep, s = ctx["results"]["prepare"], _sizes(ctx)
    prompts = prep["prompts"]
    for kv in KV_DTYPES:
        try:
            cache = CacheConfig(kv_dtype=kv, kv_cache_tokens=s["kv_cache_tokens"])
            with LLM(prep["workspace"], device=ctx["device"], cache=cache, max_batch_size=max(s["batches"])) as llm:
                def run(b: int, n: int) -> list[list[int]]:
                    outs = llm.generate(prompts[:b], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
                    return [list(o.outputs[0].token_ids) for o in outs]
                rec.add("rows", *_timed_rows(run, ctx, f"tprun (kernels: {llm.driver.runner.kernels.name})", kv))
        except Exception:  # noqa: BLE001 - recorded; the other KV dtypes still run
            rec.error(kv)


def decode_hf(ctx: dict, rec: Recorder) -> None:
    """Step 4, the baseline: transformers generate, same prompts (left-padded), EOS never stops it."""
    import torch
    from transformers import AutoModelForCausalLM

    prep, device = ctx["results"]["prepare"], ctx["device"]
    model = AutoModelForCausalLM.from_pretrained(prep["source"], dtype=getattr(torch, ctx["dtype"])).to(device).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: every row runs to max_new_tokens
    pad = prep["pad_token_id"]

    def run(b: int, n: int) -> list[list[int]]:
        rows = prep["prompts"][:b]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 pad_token_id=pad)
        return out[:, width:].tolist()  # .tolist() waits for the device

    try:
        rec.add("rows", *_timed_rows(run, ctx, "transformers generate", f"{ctx['dtype']} (HF cache)"))
    except Exception:  # noqa: BLE001 - recorded as the step's error
        rec.error("transformers")


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes``: read + write = 2 × nbytes over the median time."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(COPY_REPEATS):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times) / 1e9


def roofline(ctx: dict, rec: Recorder) -> None:
    """Step 5: bytes a decode step must read (weights + the batch's KV) over its time, vs copy bandwidth."""
    import torch

    from formats.sharding import kv_heads_per_rank
    from runtime.kv.format import BLOCK_SIZE, KVShape, kv_format
    from runtime.worker.memory import weights_bytes
    from runtime.worker.workspace import open_workspace

    prep, s = ctx["results"]["prepare"], _sizes(ctx)
    bw = copy_bandwidth(ctx["device"], s["copy_bytes"])
    rec.put("copy_GBps", bw)
    manifest = open_workspace(Path(prep["workspace"]))
    cfg, dtype = manifest.model, getattr(torch, ctx["dtype"])
    weights = weights_bytes(manifest, 0, dtype)
    rec.put("weights_bytes", weights)
    decoded = [r for step in ("decode_tprun", "decode_hf") for r in ctx["results"].get(step, {}).get("rows", [])]
    if not decoded:
        raise RuntimeError("no decode timings from step 4 to compare")
    for r in decoded:
        kv = r["kv"] if r["kv"] in KV_DTYPES else "auto"  # transformers: the compute dtype
        per_token = KVShape(cfg.num_layers, kv_heads_per_rank(cfg, 1), cfg.head_dim, kv_format(kv, dtype, cfg.head_dim),
                            BLOCK_SIZE).bytes_per_token
        mean_ctx = statistics.mean(len(p) for p in prep["prompts"][:r["batch"]]) + r["new_tokens"] / 2
        kv_bytes = r["batch"] * mean_ctx * per_token
        step_bytes = weights + kv_bytes
        rec.add("rows", {"engine": r["engine"], "kv": r["kv"], "batch": r["batch"], "mean_context": mean_ctx,
                         "weights_bytes": weights, "kv_bytes": kv_bytes, "ms_step": r["ms_step"],
                         "GBps": step_bytes / (r["ms_step"] / 1e3) / 1e9,
                         "pct_copy": 100 * step_bytes / (r["ms_step"] / 1e3) / 1e9 / bw,
                         "roofline_ms": 1e3 * step_bytes / (bw * 1e9)})


class PeakMeter:
    """Peak memory above a baseline around one call: the CUDA caching allocator's statistics, or on the
    CPU the process's peak RSS (reset through /proc/self/clear_refs), for the dry run."""

    def __init__(self, device: str):
        self.device = device

    def measure(self, fn: Callable[[], Any]) -> dict:
        import torch

        _sync(self.device)
        if self.device == "cuda":
            base, base_res = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            _sync(self.device)
            result = {"allocated": torch.cuda.max_memory_allocated() - base,
                      "reserved": torch.cuda.max_memory_reserved() - base_res}
        else:
            base = self._status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            out = fn()
            result = {"allocated": self._status("VmHWM") - base, "reserved": None}
        del out
        return result

    @staticmethod
    def _status(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reserve(ctx: dict, rec: Recorder) -> None:
    """Step 6: the planned reserve for the largest step vs the peak measured around it, after loading."""
    import torch

    from runtime.api import LLM
    from runtime.config import CacheConfig
    from runtime.engine.sampling import SamplingParams
    from runtime.worker.memory import ALLOCATOR_SLACK, reserve_bytes
    from runtime.worker.workspace import open_workspace

    prep, s, device = ctx["results"]["prepare"], _sizes(ctx), ctx["device"]
    manifest = open_workspace(Path(prep["workspace"]))
    # No kv=: an int4 cache's key tails are allocated with the cache, before the peak is reset, so the measured
    # step peak never holds them; the reserve compared is the per-step part the plan adds them to.
    predicted = reserve_bytes(manifest.model, manifest.tp, getattr(torch, ctx["dtype"]), s["max_prefill_tokens"],
                              s["max_batch_size"])
    rec.put("predicted", {"reserve": predicted, "slack": ALLOCATOR_SLACK, "max_prefill_tokens": s["max_prefill_tokens"],
                          "max_batch_size": s["max_batch_size"]})
    meter, one = PeakMeter(device), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    with LLM(prep["workspace"], device=device, cache=CacheConfig(kv_cache_tokens=s["kv_cache_tokens"]),
             max_batch_size=s["max_batch_size"], max_prefill_tokens=s["max_prefill_tokens"]) as llm:
        many = [prep["prompts"][i % len(prep["prompts"])] for i in range(s["max_batch_size"])]
        scenarios = [("prefill", lambda: meter.measure(lambda: llm.generate([prep["long_prompt"]], one))),
                     ("prompt_logits", lambda: meter.measure(lambda: llm.prompt_logits(prep["long_prompt"]))),
                     ("decode", lambda: _decode_step(llm, many, meter))]
        for name, measure in scenarios:
            try:
                rec.add("rows", {"scenario": name, **measure()})
            except Exception:  # noqa: BLE001 - recorded; the other scenarios still run
                rec.error(name)


def _decode_step(llm, prompts: list[list[int]], meter: PeakMeter) -> dict:
    """Prefill every prompt, then measure one decode step over all of them (through the engine's
    add / step / abort boundary; the step's batch is checked)."""
    from runtime.engine.sampling import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = [f"gpu-check-decode-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add(request_id, prompt, params)
    try:
        started: set[str] = set()
        while len(started) < len(ids):  # prefill (chunked as the scheduler likes) until each has its first token
            started.update(d.request_id for d in engine.step())
        deltas: list = []
        result = meter.measure(lambda: deltas.extend(engine.step()))
        if len(deltas) != len(ids):
            raise RuntimeError(f"the decode step advanced {len(deltas)} sequences, not {len(ids)}")
        return result
    finally:
        for request_id in ids:
            engine.abort(request_id)


STEPS: dict[str, Callable[[dict, Recorder], None]] = {
    "device": device_facts, "prepare": prepare, "decode_tprun": decode_tprun, "decode_hf": decode_hf,
    "roofline": roofline, "reserve": reserve}


def run_step(name: str, ctx_path: Path, out_path: Path) -> int:
    """Run one step; 0 when it recorded no error."""
    rec = Recorder(out_path)
    try:
        STEPS[name](json.loads(Path(ctx_path).read_text()), rec)
    except Exception:  # noqa: BLE001 - any failure is the step's result, written for gpu_check
        rec.error("step")
    return 1 if rec.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(run_step(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
