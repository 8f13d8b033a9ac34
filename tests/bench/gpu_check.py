"""``make gpu-check``: everything docs/benchmarks.md lacks for want of a GPU, measured in one run of
under 8 minutes on one GPU, written as Markdown (``--markdown``, default /tmp/gpu_check.md).

Sections, in this order: 1 device facts; 2 the kernel tests compiled (TRITON_INTERPRET unset);
3 ``bench-kernels`` (bench_attention, bench_w4a16) and ``bench-moe``; 4 end-to-end decode of SmolLM2-135M through
``runtime.api.LLM`` with fp16/int8/int4 KV beside transformers ``generate``, and their greedy
agreement; 5 the decode steps' bytes over their time vs the device's copy bandwidth; 6 the plan's
``reserve_bytes`` for the largest step vs the peak memory measured around it. See docs/gpu-check.md.

Every step runs in its own process under its own time limit (``STEPS``), inside a total budget
(``--budget``): a step that fails, crashes or times out is recorded and the others still run; the
exit status is 1 when any step failed. The run order is not the section order: the figures never
measured before (4-6, then 3) go first, and the compiled test suite, whose length is the least
predictable (one Triton compilation per kernel variant), gets the time that is left.

Without CUDA it prints a line and exits 0; ``--dry-run`` runs steps 1 and 4-6 on the CPU at tiny
sizes on a random tiny model (steps 2 and 3 skipped), so every code path here runs without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.config import DEFAULTS
from tests.bench import gpu_check_report as report
from tests.bench.gpu_check_report import StepResult
from tests.bench.gpu_check_steps import SMOLLM2_DIMS, TINY_DIMS, run_step

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = "gpu-check: no CUDA device; nothing measured"
BUDGET_S = 460  # the whole run, under the 8 minutes a lent GPU gives a session (the parent's own work aside)
KERNEL_TESTS = ["tests/runtime/kernels", "tests/runtime/test_paged_runtime.py"]
GPU_SIZES = {"new_tokens": 128, "batches": [1, 32], "agree_prompts": 8,
             "kv_cache_tokens": 16384,  # > 32 × (prompt + 128) and > the 2048-token prompt: no preemption
             # the server's defaults (2048, 64): the largest step it plans its reserve for
             "max_prefill_tokens": DEFAULTS.max_prefill_tokens, "max_batch_size": DEFAULTS.max_batch_size,
             "copy_bytes": 1 << 30}  # 1 GiB: launch overhead is noise
DRY_SIZES = {"new_tokens": 8, "batches": [1, 2], "agree_prompts": 8, "kv_cache_tokens": 1024,
             "max_prefill_tokens": 32, "max_batch_size": 2, "copy_bytes": 64 << 20}


@dataclass(frozen=True)
class StepSpec:
    key: str
    title: str
    cap_s: int  # its time limit
    floor_s: int  # the least time worth starting it with; later steps' floors are kept free for them
    gpu_only: bool = False  # skipped in the dry run
    needs_model: bool = False


STEPS = (  # run order
    StepSpec("device", "1 device facts", 30, 10),
    StepSpec("prepare", "0 model + tp-1 workspace", 90, 20),
    StepSpec("decode_tprun", "4a tprun decode", 100, 40, needs_model=True),
    StepSpec("decode_hf", "4b transformers decode", 60, 20, needs_model=True),
    StepSpec("roofline", "5 bandwidth roofline", 30, 10, needs_model=True),
    StepSpec("reserve", "6 reserve vs measured", 60, 20, needs_model=True),
    StepSpec("bench_attention", "3a bench_attention", 120, 30, gpu_only=True),
    StepSpec("bench_w4a16", "3b bench_w4a16", 60, 20, gpu_only=True),
    StepSpec("bench_moe", "3c bench_moe", 60, 20, gpu_only=True),
    # A cold Triton cache on an H200 compiled 237 of 303 tests in 200 s (2026-11-29): the cap is what is left.
    StepSpec("kernel_tests", "2 kernel tests (compiled)", 280, 30, gpu_only=True),
)


class Runner:
    """Runs commands in their own process group under a time limit, logging their output to one file."""

    def __init__(self, log: Path, in_process: bool):
        self.log, self.in_process = log, in_process
        self.env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TPDEPLOY_KERNELS")}
        self.env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")

    def command(self, cmd: list[str], timeout: float) -> tuple[int | None, str]:
        """(exit status or None when killed at ``timeout``, its output)."""
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: a timeout ends its children too
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            out.seek(0)
            text = out.read()
        with self.log.open("a") as f:
            f.write(f"\n===== {shlex.join(cmd)} (exit {rc}) =====\n{text}")
        return rc, text

    def step(self, key: str, ctx: dict, work: Path, timeout: float) -> tuple[int | None, dict, str]:
        """One step of gpu_check_steps: (exit status, its JSON, its output)."""
        ctx_path, out_path = work / f"{key}.ctx.json", work / f"{key}.out.json"
        ctx_path.write_text(json.dumps(ctx))
        if self.in_process:
            rc, text = run_step(key, ctx_path, out_path), ""
        else:
            rc, text = self.command([sys.executable, "-m", "tests.bench.gpu_check_steps", key, str(ctx_path),
                                     str(out_path)], timeout)
        data = json.loads(out_path.read_text()) if out_path.exists() else {}
        return rc, data, text


def _errors_note(data: dict) -> str:
    return "; ".join(f"{k}: {(tb.strip().splitlines() or ['?'])[-1]}" for k, tb in data.get("errors", {}).items())


def _tail(text: str, n: int = 15) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-n:])


def run_child(runner: Runner, spec: StepSpec, ctx: dict, work: Path, timeout: float) -> StepResult:
    rc, data, text = runner.step(spec.key, ctx, work, timeout)
    r = StepResult(spec.key, spec.title, "pass" if rc == 0 else "fail", data=data)
    if rc is None:
        r.note = f"timed out after {timeout:.0f} s" + (f" ({_errors_note(data)})" if data.get("errors") else "")
    elif rc != 0:
        r.note = _errors_note(data) or f"exit {rc}: {(text.strip().splitlines() or ['no output'])[-1]}"
    return r


def parse_pytest(text: str) -> tuple[dict[str, int], list[str]]:
    """Outcome counts from pytest -q's summary line, or from its progress marks when it was killed before
    one; and its FAILED/ERROR lines."""
    lines = text.splitlines()
    summary = next((x for x in reversed(lines) if re.search(r"\d+ (passed|failed|errors?|skipped)\b.* in [\d.]+s", x)), None)
    if summary:
        counts = {w: int(n) for n, w in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}
    else:
        marks = "".join(m.group(1) for x in lines if (m := re.fullmatch(r"([.sFExX]+)\s*(\[\s*\d+%\])?\s*", x)))
        counts = {name: marks.count(c) for c, name in ((".", "passed"), ("F", "failed"), ("E", "error"),
                                                        ("s", "skipped")) if marks.count(c)}
    return counts, [x for x in lines if x.startswith(("FAILED ", "ERROR "))][:10]


def run_pytest(runner: Runner, spec: StepSpec, timeout: float) -> StepResult:
    """Step 2: the kernel tests as pytest runs them on this machine, compiled (TRITON_INTERPRET is not passed on)."""
    cmd = [sys.executable, "-m", "pytest", "-q", *KERNEL_TESTS, "-x", "-p", "no:cacheprovider"]
    rc, text = runner.command(cmd, timeout)
    counts, failures = parse_pytest(text)
    data = {"command": "python -m pytest -q " + " ".join(KERNEL_TESTS) + " -x", "rc": rc, "counts": counts,
            "failures": failures}
    r = StepResult(spec.key, spec.title, "pass" if rc == 0 else "fail", data=data)
    if rc is None:
        r.note = f"timed out after {timeout:.0f} s; finished before that: {counts or 'nothing reported'}"
    elif rc != 0:
        r.note = "; ".join(failures[:2]) or f"pytest exit {rc}: {(text.strip().splitlines() or ['no output'])[-1]}"
    return r


def run_bench(runner: Runner, spec: StepSpec, work: Path, timeout: float) -> StepResult:
    """Step 3: one bench-kernels script, its Markdown table kept."""
    md = work / f"{spec.key}.md"
    rc, text = runner.command([sys.executable, "-m", f"tests.bench.{spec.key}", "--markdown", str(md)], timeout)
    data = {"table": md.read_text() if md.exists() else ""}
    ok = rc == 0 and bool(data["table"])
    r = StepResult(spec.key, spec.title, "pass" if ok else "fail", data=data)
    if not ok:
        last = (text.strip().splitlines() or ["no output"])[-1]
        r.note = f"timed out after {timeout:.0f} s" if rc is None else f"exit {rc}, no table: {last}"
    return r


def _time_limit(spec: StepSpec, later: list[StepSpec], deadline: float) -> float:
    return min(spec.cap_s, deadline - time.monotonic() - sum(s.floor_s for s in later))


def run_all(args: argparse.Namespace, work: Path, ctx: dict) -> dict[str, StepResult]:
    """Every step in run order, each under its limit; steps that cannot run are recorded as skipped or failed."""
    runner = Runner(args.log, args.in_process)
    steps = [s for s in STEPS if not (args.dry_run and s.gpu_only)]
    results = {s.key: StepResult(s.key, s.title, note="dry run: needs a GPU") for s in STEPS if s not in steps}
    deadline = time.monotonic() + args.budget
    for i, spec in enumerate(steps):
        limit = _time_limit(spec, steps[i + 1:], deadline)
        print(f"gpu-check: {spec.title} (limit {max(0, limit):.0f} s) ...", flush=True)
        t = time.monotonic()
        if spec.needs_model and results["prepare"].status != "pass":
            r = StepResult(spec.key, spec.title, "fail", note="no workspace: step 0 (prepare) failed")
        elif limit < spec.floor_s:
            r = StepResult(spec.key, spec.title, "skip", note=f"only {max(0, limit):.0f} s of the budget left")
        elif spec.key == "kernel_tests":
            r = run_pytest(runner, spec, limit)
        elif spec.key.startswith("bench_"):
            r = run_bench(runner, spec, work, limit)
        else:
            r = run_child(runner, spec, ctx, work, limit)
            ctx["results"][spec.key] = r.data
        r.seconds, r.limit_s = time.monotonic() - t, None if r.status == "skip" else limit
        results[spec.key] = r
        print(f"gpu-check: {spec.title}: {r.status} in {r.seconds:.1f} s {r.note}", flush=True)
    return {s.key: results[s.key] for s in STEPS}


def _model(args: argparse.Namespace) -> tuple[str | None, dict | None, str]:
    """(checkpoint path or None, random model dims or None, how the report names the model)."""
    from tests.fixtures.smollm2 import MODEL_DIR_NAME, REQUIRED_FILES, cache_dir

    if args.dry_run:
        return None, TINY_DIMS, "a random tiny Llama (tests/fixtures/tiny.py)"
    path = Path(args.model or cache_dir() / MODEL_DIR_NAME).expanduser()
    if all((path / f).is_file() for f in ("config.json", "tokenizer.json")) and (
            args.model or all((path / f).is_file() for f in REQUIRED_FILES)):
        return str(path), None, f"SmolLM2-135M-Instruct ({path})" if not args.model else str(path)
    if args.model:
        raise SystemExit(f"gpu-check: --model {path} is not a Hugging Face checkpoint (config.json, tokenizer.json)")
    return None, SMOLLM2_DIMS, (f"**random weights** in SmolLM2-135M-Instruct's shape (seed 1234; the checkpoint is "
                                f"not at {path}: `make model` builds it). Speed and memory are the real model's; "
                                "greedy agreement is measured on random logits")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", type=Path, default=Path("/tmp/gpu_check.md"), help="the report (default %(default)s)")
    ap.add_argument("--log", type=Path, default=Path("/tmp/gpu_check.log"), help="every step's output (default %(default)s)")
    ap.add_argument("--json", type=Path, help="also write every step's raw results here")
    ap.add_argument("--model", help="a Hugging Face checkpoint instead of $TPDEPLOY_CACHE/smollm2-135m-instruct")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps (default %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="steps 1, 4-6 on the CPU, tiny sizes, a random tiny model")
    ap.add_argument("--in-process", action="store_true",
                    help="run steps 1 and 4-6 in this process, without time limits (the test of the dry run)")
    return ap.parse_args(argv)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not args.dry_run and not _has_cuda():
        print(NO_CUDA)
        return 0
    model, dims, label = _model(args)
    dtype = "float16"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = {"dry_run": args.dry_run, "device": "cpu" if args.dry_run else "cuda", "dtype": dtype, "model": model,
               "random_dims": dims, "work": tmp, "sizes": DRY_SIZES if args.dry_run else GPU_SIZES, "results": {}}
        results = run_all(args, Path(tmp), ctx)
    meta = {"device_name": results["device"].data.get("facts", {}).get("device", "unknown device"),
            "date": datetime.date.today().isoformat(), "model_label": label, "dry_run": args.dry_run,
            "command": "python -m tests.bench.gpu_check " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "sizes": ctx["sizes"], "dtype": dtype}
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report.render(results, meta))
    if args.json:
        args.json.write_text(json.dumps({k: dataclasses.asdict(r) for k, r in results.items()}, indent=1))
    print("\n".join(report.summary(list(results.values()))))
    failed = [r.title for r in results.values() if r.status == "fail"]
    print(f"gpu-check: {len(failed)} step(s) failed{': ' + ', '.join(failed) if failed else ''}; "
          f"report: {args.markdown}; log: {args.log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
