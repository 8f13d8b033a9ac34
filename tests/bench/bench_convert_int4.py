"""Benchmark ``tpconv convert`` on quantized checkpoints (AWQ, GPTQ, FP8), against a plain copy of the same bytes.

What is measured (the fp32 part is ``tests.bench.bench_convert``, whose helpers this reuses):

* ``tpconv convert SRC -o DST --tp N --force --json`` in a fresh process: seconds (the converter's own
  ``seconds``), MB/s of the bytes it writes (``total_bytes``), peak RSS (its VmHWM, ``peak_rss_bytes``).
  The converter reads AutoAWQ's qweight/qzeros/scales, unpacks AWQ's interleaved nibbles and repacks
  them into the canonical ``tpdeploy-int4-v1`` layout, sliced per rank; GPTQ's the same way (act-order:
  rows reordered by g_idx, w_down's order folded into gate/up); FP8 weights are only sliced, their scales
  made canonical (per row x per K block); fp16/bf16 tensors are only sliced.
* Models: the real AutoAWQ-quantized SmolLM2-135M (``tests.fixtures.quantized.awq_smollm2_path()``;
  9 heads, so tp 1 and 3), read through a directory of symlinks holding the checkpoint's own files only
  (the fixture keeps a 425 MB ``dequant_reference.safetensors`` beside them, which the converter would
  take for a weight file); and a random Llama (hidden 2048, 16/8 heads, intermediate 5632, 8 layers,
  vocab 32000, group 64: ~466 MB of int4 + fp16 embeddings) made by ``make_tiny_awq`` once into
  ``$TPDEPLOY_CACHE/bench-llama-awq/`` (tp 1 and 4); the same random Llama as GPTQ with act-order
  (``make_tiny_gptq``, group 64, random g_idx, ``bench-llama-gptq``) and as block FP8 (``make_tiny_fp8``,
  128 x 128 blocks, ``bench-llama-fp8``); the real FP8_DYNAMIC SmolLM2 of llm-compressor
  (``fp8_smollm2_path()``, tp 1 and 3).
* Baseline: a plain copy (chunked read/write + fsync) of the same source weight files, right before
  each conversion -> convert MB/s / copy MB/s. The converter also repacks int4, so no target is set.
* Peak RSS against 1.5 x largest layer (embedding, lm_head or one decoder layer, from the safetensors
  headers) + the interpreter baseline (a process that only imports ``converter.convert``).

Median of 3 runs by default; nothing asserted. ``python -m tests.bench.bench_convert_int4
[--markdown PATH [--append]] [--reps N] [--models smollm2-awq,llama-awq,...]`` (see ``MODELS``).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.bench_convert import (
    MB,
    Model,
    Row,
    as_markdown,
    as_text,
    bench_model,
    describe,
    interpreter_baseline,
    memory_table,
    throughput_table,
)
from tests.fixtures.quantized import REFERENCE_FILE, REPORT_FILE, awq_smollm2_path, fp8_smollm2_path, gptq_smollm2_path
from tests.fixtures.smollm2 import cache_dir

LLAMA_SPEC: dict[str, Any] = {"arch": "llama", "num_layers": 8, "hidden": 2048, "heads": 16, "kv_heads": 8,
                              "intermediate": 5632, "vocab": 32000, "seed": 1234}
# name -> (generator in tests.fixtures, its format arguments); each cached as $TPDEPLOY_CACHE/bench-<name>
GENERATED: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-awq": ("int4_pack.make_tiny_awq", {"group_size": 64}),
    "llama-gptq": ("gptq_pack.make_tiny_gptq", {"group_size": 64, "desc_act": True, "wo_local": 4}),
    "llama-fp8": ("fp8_pack.make_tiny_fp8", {"scheme": "block"}),
}
REAL = {"smollm2-awq": (awq_smollm2_path, "AutoAWQ 0.2.9 GEMM, group 64"),
        "smollm2-fp8": (fp8_smollm2_path, "llm-compressor FP8_DYNAMIC (per-channel scales)"),
        "smollm2-gptq": (gptq_smollm2_path, "AutoRound 0.15.1 auto_gptq export, group 64, symmetric")}
MODELS = (*REAL, *GENERATED)
NOT_CHECKPOINT = (REFERENCE_FILE, REPORT_FILE)  # test artefacts the quantized fixture keeps beside its files
SPEC_FILE = "bench_spec.json"


def _generate(name: str, tmp: Path) -> None:
    """The generator builds the fp32 model in memory (~2 GB, ~3 GB peak), quantizes RTN, writes one file."""
    import importlib

    where, fmt = GENERATED[name]
    module, func = where.split(".")
    make = getattr(importlib.import_module(f"tests.fixtures.{module}"), func)
    make(tmp, **LLAMA_SPEC, **fmt)  # writes tokenizer.json (a tiny BPE) too: the converter needs one
    (tmp / SPEC_FILE).write_text(json.dumps(_spec(name)))


def _spec(name: str) -> dict[str, Any]:
    return {**LLAMA_SPEC, **GENERATED[name][1], "generator": GENERATED[name][0]}


def generated_path(name: str) -> tuple[Path, float | None]:
    """A generated quantized Llama (temp dir + rename, under a lock), and its generation seconds if made now."""
    final = cache_dir() / f"bench-{name}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be generating it right now
        marker = final / SPEC_FILE
        if marker.is_file() and json.loads(marker.read_text()) == _spec(name):
            return final, None
        for stale in [final, *final.parent.glob(f".{final.name}.tmp-*")]:  # an old spec, a killed run's
            shutil.rmtree(stale, ignore_errors=True)
        tmp, t0 = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent)), time.perf_counter()
        print(f"generating {final} ({_spec(name)}) ...", flush=True)
        try:
            _generate(name, tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    print(f"generated in {seconds:.1f}s", flush=True)
    return final, seconds


def checkpoint_view(src: Path, dst: Path) -> Path:
    """``dst`` with a symlink to every file of ``src`` except the fixture's test artefacts."""
    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in NOT_CHECKPOINT:
            (dst / f.name).symlink_to(f)
    return dst


def load_models(keys: list[str], work: Path) -> tuple[list[Model], list[str]]:
    """The requested models, described from their headers, and notes on how they were obtained."""
    models, notes = [], []
    for key in keys:
        if key in REAL:
            build, what = REAL[key]
            real = build()
            models.append(describe(key, checkpoint_view(real, work / f"{key}-src"), (1, 3)))
            notes.append(f"{key}: {what}, of SmolLM2-135M-Instruct ({real}); tied embedding; 9 heads, so tp 1 "
                         f"and 3. Read through symlinks to its own files (without {REFERENCE_FILE}, a test "
                         "artefact kept in the same directory).")
        elif key in GENERATED:
            path, gen = generated_path(key)
            models.append(describe(key, path, (1, 4)))
            made = f"generated in this run in {gen:.0f}s" if gen is not None else "cached"
            notes.append(f"{key}: random Llama {LLAMA_SPEC} made by {GENERATED[key][0]}({GENERATED[key][1]}), "
                         f"RTN, untied embedding and lm_head ({made}, {path}).")
        else:
            raise SystemExit(f"unknown model {key!r}; expected some of {', '.join(MODELS)}")
    return models, notes


def int4_notes(reps: int, models: list[Model], load: list[float], how: list[str]) -> list[str]:
    out = [f"Load average (1 min) {load[0]:.2f} before, {load[-1]:.2f} after the runs ({os.cpu_count()} CPUs).",
           f"Median of {reps} runs each. Each copy (of the same source files, + fsync) runs right before its "
           "conversion, so both read a warm page cache; both write to the same filesystem.",
           "convert s/MB/s: the converter's own timing (--json `seconds`, MB written / seconds), which "
           "includes unpacking AWQ's and GPTQ's nibbles and repacking into tpdeploy-int4-v1 (FP8: only scales "
           "are rewritten); wall s adds "
           "interpreter start and imports; CPU s is user + system time of all its threads. No target is set "
           "for convert / copy.", *how]
    return out + [f"{m.name}: {len(m.files)} weight file(s), {m.source_bytes / MB:.0f} MB, largest layer "
                  f"{m.largest_bytes / MB:.1f} MB ({m.largest_what})." for m in models]


def tables(rows: list[Row], baseline: int) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    head, body = throughput_table(rows)
    head = ["convert / copy (no target)" if h.startswith("convert / copy") else h for h in head]
    return [("Quantized checkpoints: throughput vs. plain file copy", (head, body)),
            ("Quantized checkpoints: peak RSS vs. the streaming bound", memory_table(rows, baseline))]


def report(rows: list[Row], baseline: int, lines: list[str], markdown: Path | None, append: bool) -> None:
    print()
    for title, (head, body) in tables(rows, baseline):
        print(f"== {title}\n{as_text(head, body)}\n")
    print("\n".join(f"* {n}" for n in lines))
    if markdown:
        md = [f"**{title}**\n\n{as_markdown(head, body)}\n" for title, (head, body) in tables(rows, baseline)]
        md.append("\n".join(f"- {n}" for n in lines) + "\n")
        with open(markdown, "a" if append else "w") as f:
            f.write(("\n" if append and markdown.stat().st_size else "") + "\n".join(md))
        print(f"\n{'appended to' if append else 'wrote'} {markdown}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    p.add_argument("--append", action="store_true", help="append to --markdown (e.g. bench_convert's) instead")
    p.add_argument("--reps", type=int, default=3, help="repetitions per measurement (median reported)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the default")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tpdeploy-bench-int4-", dir="/tmp"))  # DST and copies: same filesystem
    try:
        models, how = load_models(args.models.split(","), work)
        load = os.getloadavg()[0]
        baseline = interpreter_baseline(args.reps)
        print(f"interpreter baseline (import converter.convert): {baseline / MB:.0f} MB VmHWM", flush=True)
        rows = [row for m in models for row in bench_model(m, work, args.reps, False)]
        lines = int4_notes(args.reps, models, [load, os.getloadavg()[0]], how)
        report(rows, baseline, lines, args.markdown, args.append)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
