"""Benchmark ``tpconv convert``: throughput and peak memory, each against a baseline from the same run.

What is measured, and why:

* ``tpconv convert SRC -o DST --tp N --force --json`` in a fresh process (so its peak RSS is its own),
  on the real SmolLM2-135M-Instruct (fp32, 538 MB; it has 9 heads, so tp 1 and 3) and on a random
  ~2 GB fp32 Llama generated once into ``$TPDEPLOY_CACHE/bench-llama-2g/`` (tp 1 and 4).
* Baseline 1, a plain copy of the same source weight files (chunked read/write + fsync, on the
  same filesystem as DST), run right before each conversion so both see a warm page cache. Target:
  convert MB/s >= 0.5 x copy MB/s.
* Peak RSS (VmHWM) against the streaming bound: 1.5 x largest layer (largest of the embedding, the
  lm_head and one decoder layer) + the interpreter baseline (a process that only imports
  ``converter.convert``). Target: peak / bound <= 1.
* Baseline 2, the naive path: ``AutoModelForCausalLM.from_pretrained`` then ``torch.chunk`` per
  weight, every rank's shard kept in memory, saved with safetensors (+ fsync), for time and RSS.

Every measurement is repeated (3 times by default) and the median reported. Timings are never
asserted: this is a script (``python -m tests.bench.bench_convert [--markdown PATH]``), not a test.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from formats.safetensors_io import read_header
from tests.fixtures.smollm2 import cache_dir, smollm2_path

ROOT = Path(__file__).resolve().parents[2]
TPCONV = str(Path(sys.executable).parent / "tpconv")  # the console script of this interpreter's venv
MB = 1e6
LLAMA_DIR = "bench-llama-2g"
LLAMA_TARGET_BYTES = 2_000_000_000
LLAMA_DIMS = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8,
              "intermediate_size": 5632, "vocab_size": 32000}
LLAMA_SEED = 1234
SHARD_LIMIT = 600_000_000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
NAIVE_MEMORY_FACTOR = 3  # the naive path is skipped unless this many times the model is available

HWM = """
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
"""
BASELINE_SCRIPT = HWM + "import json, converter.convert\nprint(json.dumps({'peak_rss_bytes': hwm()}))\n"
COPY_SCRIPT = HWM + """
import json, os, sys, time
dst, files = sys.argv[1], sys.argv[2:]
buf = bytearray(16 << 20); view = memoryview(buf); n = 0
t0 = time.perf_counter()
for src in files:
    with open(src, 'rb', buffering=0) as fi, open(os.path.join(dst, os.path.basename(src)), 'wb') as fo:
        while k := fi.readinto(buf):
            fo.write(view[:k]); n += k
        fo.flush(); os.fsync(fo.fileno())
print(json.dumps({'seconds': time.perf_counter() - t0, 'bytes': n, 'peak_rss_bytes': hwm()}))
"""
NAIVE_SCRIPT = HWM + """
import json, os, sys, time
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
src, dst, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
ROWS = ('q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj', 'embed_tokens', 'lm_head')
COLS = ('o_proj', 'down_proj')
base, t0 = hwm(), time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
sd = model.state_dict()
if model.config.tie_word_embeddings:
    sd.pop('lm_head.weight', None)
ranks = [{} for _ in range(tp)]
for name, t in sd.items():
    leaf = name.split('.')[-2]
    axis = 0 if leaf in ROWS else 1 if leaf in COLS else None
    parts = [t] * tp if axis is None else torch.chunk(t, tp, dim=axis)
    for r, part in enumerate(parts):
        ranks[r][name] = part.clone()  # every rank's shard lives in memory until saved
n = 0
for r, shard in enumerate(ranks):
    path = os.path.join(dst, f'rank{r}.safetensors')
    save_file(shard, path, metadata={'format': 'pt'})
    fd = os.open(path, os.O_RDONLY); os.fsync(fd); os.close(fd)
    n += os.path.getsize(path)
print(json.dumps({'seconds': time.perf_counter() - t0, 'bytes': n, 'peak_rss_bytes': hwm(),
                  'import_rss_bytes': base}))
"""


@dataclass
class Model:
    name: str
    path: Path
    tps: tuple[int, ...]
    files: list[Path]
    source_bytes: int
    largest_bytes: int
    largest_what: str


@dataclass
class Row:
    model: Model
    tp: int
    copies: list[dict] = field(default_factory=list)
    converts: list[dict] = field(default_factory=list)
    naive: list[dict] = field(default_factory=list)
    naive_skip: str = ""


def llama_spec() -> dict:
    """LLAMA_DIMS with as many decoder layers as bring the fp32 checkpoint nearest 2 GB."""
    h, i, v = LLAMA_DIMS["hidden_size"], LLAMA_DIMS["intermediate_size"], LLAMA_DIMS["vocab_size"]
    head_dim = h // LLAMA_DIMS["num_attention_heads"]
    kv = LLAMA_DIMS["num_key_value_heads"] * head_dim
    layer = 4 * (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h)
    layers = max(1, round((LLAMA_TARGET_BYTES - 4 * (2 * v * h + h)) / layer))
    return {**LLAMA_DIMS, "head_dim": head_dim, "num_hidden_layers": layers, "seed": LLAMA_SEED,
            "shard_bytes": SHARD_LIMIT}


def llama_config(spec: dict) -> dict:
    dims = {k: v for k, v in spec.items() if k not in ("seed", "shard_bytes")}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **dims,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "dtype": "float32",
            "transformers_version": "5.23.0"}


def llama_tensors(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Standard HF Llama tensor names and shapes, in checkpoint order."""
    h, i, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    q, kv = spec["num_attention_heads"] * spec["head_dim"], spec["num_key_value_heads"] * spec["head_dim"]
    layer = [("input_layernorm", (h,)), ("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)),
             ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, q)), ("post_attention_layernorm", (h,)),
             ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))]
    body = [(f"model.layers.{n}.{t}.weight", shape) for n in range(spec["num_hidden_layers"]) for t, shape in layer]
    return [("model.embed_tokens.weight", (v, h)), *body, ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _shard_plan(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors into shards of about SHARD_LIMIT bytes (a layer may straddle two, as in HF)."""
    shards: dict[int, list] = {}
    offset = 0
    for name, shape in tensors:
        shards.setdefault(offset // SHARD_LIMIT, []).append((name, shape))
        offset += 4 * math.prod(shape)
    return list(shards.values())


def _generate(tmp: Path, spec: dict) -> None:
    """Write the checkpoint one shard at a time; each tensor comes from one seeded generator."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(spec["seed"])
    plan = _shard_plan(llama_tensors(spec))
    weight_map, total = {}, 0
    for k, shard in enumerate(plan, 1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: torch.empty(shape).normal_(1.0 if len(shape) == 1 else 0.0, 0.02, generator=gen)
                   for name, shape in shard}  # norms near 1, matrices N(0, 0.02)
        save_file(tensors, tmp / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.numel() * 4 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(llama_config(spec), indent=2))
    for name in TOKENIZER_FILES:  # the converter requires tokenizer.json; SmolLM2's serves
        if (smollm2_path() / name).is_file():
            shutil.copyfile(smollm2_path() / name, tmp / name)
    (tmp / "bench_spec.json").write_text(json.dumps(spec))


def llama_path() -> Path:
    """The generated checkpoint, built once (temp dir + rename) and reused while its spec matches."""
    spec, final = llama_spec(), cache_dir() / LLAMA_DIR
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{LLAMA_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be generating it right now
        marker = final / "bench_spec.json"
        if marker.is_file() and json.loads(marker.read_text()) == spec:
            return final
        for stale in [final, *final.parent.glob(f".{LLAMA_DIR}.tmp-*")]:  # an old spec, a killed run's
            shutil.rmtree(stale, ignore_errors=True)
        tmp, t0 = Path(tempfile.mkdtemp(prefix=f".{LLAMA_DIR}.tmp-", dir=final.parent)), time.perf_counter()
        print(f"generating {final} ({spec['num_hidden_layers']} layers, seed {spec['seed']}) ...", flush=True)
        try:
            _generate(tmp, spec)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"generated in {time.perf_counter() - t0:.1f}s", flush=True)
    return final


def tensor_bytes(files: list[Path]) -> dict[str, int]:
    """Byte size of every tensor, from the safetensors headers alone."""
    return {name: info.nbytes for path in files for name, info in read_header(path)[0].items()}


def largest_layer(sizes: dict[str, int]) -> tuple[int, str]:
    """The largest of: the embedding, the lm_head, one decoder layer (all its weights)."""
    groups = {"embedding": sizes.get("model.embed_tokens.weight", 0), "lm_head": sizes.get("lm_head.weight", 0)}
    for name, n in sizes.items():
        if name.startswith("model.layers."):
            key = "decoder layer " + name.split(".")[2]
            groups[key] = groups.get(key, 0) + n
    what = max(groups, key=lambda k: groups[k])
    return groups[what], "decoder layer" if what.startswith("decoder") else what


def describe(name: str, path: Path, tps: tuple[int, ...]) -> Model:
    files = sorted(path.glob("*.safetensors"))
    largest, what = largest_layer(tensor_bytes(files))
    return Model(name, path, tps, files, sum(f.stat().st_size for f in files), largest, what)


def _run_json(args: list[str], timeout: int = 900) -> dict:
    """Run a measuring subprocess; its stdout ends with one JSON object."""
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime  # the child's CPU, its threads included
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} ... failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout[out.stdout.index("{"):]), "wall": wall, "cpu": cpu}  # tpconv's JSON or ours


def interpreter_baseline(reps: int) -> int:
    runs = [_run_json([sys.executable, "-c", BASELINE_SCRIPT]) for _ in range(reps)]
    return int(med(runs, "peak_rss_bytes"))


def _in_scratch(work: Path, name: str, args: list[str]) -> dict:
    """Run ``args`` (``DST`` stands for a fresh dir ``work/name``) once earlier write-back is flushed."""
    dst = work / name
    shutil.rmtree(dst, ignore_errors=True)  # for tpconv: so --force's removal of an old one is not timed
    if name != "workspace":
        dst.mkdir()
    os.sync()  # no write-back left over from an earlier step may slow this one down
    try:
        return _run_json([str(dst) if a == "DST" else a for a in args])
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def bench_model(model: Model, work: Path, reps: int, naive: bool) -> list[Row]:
    rows, src, files = [], str(model.path), [str(f) for f in model.files]
    for tp in model.tps:
        row = Row(model, tp)
        for rep in range(reps):  # the copy right before the conversion: both see the same warm cache
            row.copies.append(_in_scratch(work, "copy", [sys.executable, "-c", COPY_SCRIPT, "DST", *files]))
            row.converts.append(_in_scratch(work, "workspace", [
                TPCONV, "convert", src, "-o", "DST", "--tp", str(tp), "--force", "--json"]))
            print(f"  {model.name} tp={tp} rep {rep + 1}/{reps}: copy {row.copies[-1]['seconds']:.2f}s, "
                  f"convert {row.converts[-1]['seconds']:.2f}s", flush=True)
        available = psutil.virtual_memory().available
        if not naive:
            row.naive_skip = "skipped (--no-naive)"
        elif available < NAIVE_MEMORY_FACTOR * model.source_bytes:
            row.naive_skip = (f"skipped: {available / MB:.0f} MB available < {NAIVE_MEMORY_FACTOR} x model "
                              f"({model.source_bytes / MB:.0f} MB)")
        for rep in range(0 if row.naive_skip else reps):
            row.naive.append(_in_scratch(work, "naive", [sys.executable, "-c", NAIVE_SCRIPT, src, "DST", str(tp)]))
            print(f"  {model.name} tp={tp} naive rep {rep + 1}/{reps}: {row.naive[-1]['seconds']:.2f}s", flush=True)
        rows.append(row)
    return rows


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def throughput_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "tp", "source MB", "written MB", "copy s", "copy MB/s", "convert s", "convert MB/s",
            "convert / copy (target >= 0.5)", "convert wall s", "convert CPU s"]
    body = []
    for r in rows:
        copy_mbs = med(r.copies, "bytes") / MB / med(r.copies, "seconds")
        written = med(r.converts, "total_bytes")
        conv_mbs = written / MB / med(r.converts, "seconds")
        body.append([r.model.name, str(r.tp), f"{r.model.source_bytes / MB:.0f}", f"{written / MB:.0f}",
                     f"{med(r.copies, 'seconds'):.2f}", f"{copy_mbs:.0f}", f"{med(r.converts, 'seconds'):.2f}",
                     f"{conv_mbs:.0f}", f"{conv_mbs / copy_mbs:.2f}", f"{med(r.converts, 'wall'):.2f}",
                     f"{med(r.converts, 'cpu'):.2f}"])
    return head, body


def memory_table(rows: list[Row], baseline: int) -> tuple[list[str], list[list[str]]]:
    head = ["model", "tp", "largest layer MB", "interpreter MB", "bound MB (1.5 x layer + interp.)",
            "peak RSS MB", "peak / bound (target <= 1)", "(peak - interp.) / layer"]
    body = []
    for r in rows:
        peak, layer = med(r.converts, "peak_rss_bytes"), r.model.largest_bytes
        bound = 1.5 * layer + baseline
        body.append([r.model.name, str(r.tp), f"{layer / MB:.0f} ({r.model.largest_what})", f"{baseline / MB:.0f}",
                     f"{bound / MB:.0f}", f"{peak / MB:.0f}", f"{peak / bound:.2f}",
                     f"{(peak - baseline) / layer:.2f}"])
    return head, body


def naive_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "tp", "naive s", "naive peak RSS MB", "naive RSS after imports MB", "convert s",
            "convert peak RSS MB", "naive / convert time", "naive / convert RSS"]
    body = []
    for r in rows:
        cs, cp = med(r.converts, "seconds"), med(r.converts, "peak_rss_bytes")
        ns, np_, ni = (med(r.naive, k) if r.naive else 0 for k in ("seconds", "peak_rss_bytes", "import_rss_bytes"))
        naive = [f"{ns:.2f}", f"{np_ / MB:.0f}", f"{ni / MB:.0f}"] if r.naive else [r.naive_skip, "", ""]
        ratios = [f"{ns / cs:.2f}", f"{np_ / cp:.2f}"] if r.naive else ["", ""]
        body.append([r.model.name, str(r.tp), *naive, f"{cs:.2f}", f"{cp / MB:.0f}", *ratios])
    return head, body


def as_text(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [head, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                     for cells in lines)


def as_markdown(head: list[str], body: list[list[str]]) -> str:
    rows = [head, ["---" if i < 2 else "---:" for i in range(len(head))], *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


def notes(reps: int, models: list[Model], load: list[float]) -> list[str]:
    out = [f"Load average (1 min) {load[0]:.2f} before, {load[-1]:.2f} after the runs ({os.cpu_count()} CPUs): "
           "other processes on the machine slow everything down, the converter (CPU-bound) most.",
           f"Median of {reps} runs each. Each copy runs right before its conversion, so both read a warm "
           "page cache (no cache is dropped); both write to the same filesystem and fsync.",
           "convert s/MB/s: the converter's own timing (--json `seconds`, MB written / seconds); "
           "wall s adds interpreter start and imports; CPU s is user + system time of all its threads.",
           "naive: from_pretrained + torch.chunk + save_file + fsync, timed from from_pretrained on "
           "(imports excluded); its peak RSS includes transformers' imports."]
    if any(m.name.startswith("smollm2") for m in models):
        out.append("SmolLM2-135M has 9 attention heads (3 KV heads): converted with tp 1 and 3 (tp 4 is invalid).")
    return out + [f"{m.name}: {len(m.files)} weight file(s), {m.source_bytes / MB:.0f} MB, largest layer "
                  f"{m.largest_bytes / MB:.1f} MB ({m.largest_what})." for m in models]


def report(rows: list[Row], baseline: int, reps: int, models: list[Model], load: list[float],
           markdown: Path | None) -> None:
    tables = [("Throughput vs. plain file copy", throughput_table(rows)),
              ("Peak RSS vs. the streaming bound", memory_table(rows, baseline)),
              ("Naive path (from_pretrained + torch.chunk)", naive_table(rows))]
    print()
    for title, (head, body) in tables:
        print(f"== {title}\n{as_text(head, body)}\n")
    lines = notes(reps, models, load)
    print("\n".join(f"* {n}" for n in lines))
    if markdown:
        md = [f"**{title}**\n\n{as_markdown(head, body)}\n" for title, (head, body) in tables]
        md.append("\n".join(f"- {n}" for n in lines) + "\n")
        markdown.write_text("\n".join(md))
        print(f"\nwrote {markdown}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    p.add_argument("--reps", type=int, default=3, help="repetitions per measurement (median reported)")
    p.add_argument("--models", default="smollm2,llama-2g", help="comma-separated subset of smollm2,llama-2g")
    p.add_argument("--no-naive", action="store_true", help="skip the naive from_pretrained baseline")
    args = p.parse_args(argv)
    known = {"smollm2": ("smollm2-135m", smollm2_path, (1, 3)), "llama-2g": ("llama-2g", llama_path, (1, 4))}
    models = [describe(name, path(), tps) for key, (name, path, tps) in known.items() if key in args.models.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tpdeploy-bench-", dir="/tmp"))  # DST, copies and naive output: same filesystem
    try:
        load = os.getloadavg()[0]
        baseline = interpreter_baseline(args.reps)
        print(f"interpreter baseline (import converter.convert): {baseline / MB:.0f} MB VmHWM", flush=True)
        rows = [row for m in models for row in bench_model(m, work, args.reps, not args.no_naive)]
        report(rows, baseline, args.reps, models, [load, os.getloadavg()[0]], args.markdown)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
