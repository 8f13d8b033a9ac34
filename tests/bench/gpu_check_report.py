"""The Markdown of ``gpu_check``: one section per step, in the order of the issue (1 device … 6 reserve),
then the pass/fail summary. Pure formatting of the steps' JSON; nothing is measured here."""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
SCENARIOS = {  # step 6 rows: what each measured call is, against the plan's largest step
    "prefill": "prefill of {p} tokens, one sequence (a server step: last-token logits)",
    "prompt_logits": "`llm.prompt_logits` of {p} tokens (logits at all {p} positions: not a server step)",
    "decode": "one decode step of {b} sequences",
}


@dataclass
class StepResult:
    """What one step left: pass / fail / skip, its time, its limit, its JSON, and why it failed or was skipped."""

    key: str
    title: str
    status: str = "skip"
    seconds: float = 0.0
    limit_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _status(r: StepResult) -> list[str]:
    if r.status == "pass":
        return []
    word = "**FAILED**" if r.status == "fail" else "*skipped*"
    return [f"{word} ({r.title}): {r.note or 'see the log'}", ""]


def _numeric(cell: Any) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,]+\s*(%|×|s)?|–|", str(cell).strip()))


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table; a column of numbers (or blanks) is right-aligned."""
    align = ["---:" if rows and all(_numeric(r[i]) for r in rows) else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def device(r: StepResult) -> list[str]:
    facts = r.data.get("facts", {})
    return ["### 1. Device", "", *_status(r), *_table(["fact", "value"], [[k, v] for k, v in facts.items()])]


def kernel_tests(r: StepResult) -> list[str]:
    out = ["### 2. Kernel tests, compiled (TRITON_INTERPRET unset)", "", *_status(r)]
    if "counts" in r.data:
        out += [f"`{r.data['command']}` → exit {r.data['rc']} in {r.seconds:.0f} s", ""]
        out += _table(["outcome", "tests"], [[k, v] for k, v in r.data["counts"].items()])
        out += [f"- `{line}`" for line in r.data.get("failures", [])] + ([""] if r.data.get("failures") else [])
    return out


def bench_kernels(*steps: StepResult) -> list[str]:
    out = ["### 3. Kernel benchmarks (`make bench-kernels`, `make bench-moe`)", ""]
    for r in steps:
        out += [f"**{r.title}**", "", *_status(r)]
        if r.data.get("table"):
            out += [r.data["table"].rstrip(), ""]
    return out


def decode(tprun: StepResult, hf: StepResult, meta: dict) -> list[str]:
    out = [f"### 4. End-to-end decode: {meta['model_label']}", "",
           (f"Greedy, {meta['sizes']['new_tokens']} new tokens per sequence, EOS ignored, {meta['dtype']} weights, "
            "after one warm-up generate per batch size. tok/s = generated tokens / wall time of the whole generate "
            "(prefill included); ms/step = (t(N tokens) − t(1 token)) / (N − 1), the decode steps alone."), "",
           *_status(tprun), *_status(hf)]
    rows = tprun.data.get("rows", []) + hf.data.get("rows", [])
    base = {r["batch"]: r["tok_s"] for r in hf.data.get("rows", [])}
    table = [[r["engine"], r["kv"], r["batch"], f"{r['tok_s']:.1f}", f"{r['ms_step']:.2f}", f"{r['prefill_s']:.3f}",
              f"{r['tok_s'] / base[r['batch']]:.2f}×" if r["batch"] in base else "–",
              r["short_rows"] or ""] for r in rows]
    out += _table(["engine", "KV", "batch", "tok/s", "ms/step", "prefill + 1st token s", "tok/s vs transformers",
                   "rows stopped short"], table)
    return out + agreement(tprun, hf)


def _agree(a: list[list[int]], b: list[list[int]]) -> tuple[float, int, float]:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    prefix = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb))) for ra, rb in zip(a, b)]
    return same / max(1, total), sum(ra == rb for ra, rb in zip(a, b)), statistics.mean(prefix) if prefix else 0.0


def agreement(tprun: StepResult, hf: StepResult) -> list[str]:
    ref = next((r["tokens"] for r in hf.data.get("rows", []) if r.get("tokens")), None)
    if ref is None:
        return ["Greedy agreement: no transformers tokens to compare.", ""]
    rows = []
    for r in (r for r in tprun.data.get("rows", []) if r.get("tokens")):
        frac, whole, prefix = _agree(r["tokens"], ref)
        rows.append([r["kv"], len(r["tokens"]), f"{100 * frac:.1f} %", f"{whole}/{len(r['tokens'])}", f"{prefix:.1f}"])
    return [("Greedy agreement with transformers (same prompts, largest batch, first prompts): position by position; "
             "after the first different token the two continue from different text."), "",
            *_table(["tprun KV", "prompts", "identical tokens", "prompts identical throughout",
                     "mean tokens before the first difference"], rows)]


def roofline(r: StepResult) -> list[str]:
    out = ["### 5. Decode bandwidth roofline", "", *_status(r)]
    if "copy_GBps" in r.data:
        out += [(f"Copy bandwidth: {r.data['copy_GBps']:.0f} GB/s (device-to-device copy, bytes read + written, "
                 "median of 10). Bytes per step = all weights + K and V of every token of the batch at its mean "
                 "context (prompt + N/2), read once: the least a decode step must move. % = achieved / copy "
                 "bandwidth."), ""]
    rows = [[x["engine"], x["kv"], x["batch"], f"{x['mean_context']:.0f}", f"{x['weights_bytes'] / 1e6:.1f}",
             f"{x['kv_bytes'] / 1e6:.2f}", f"{x['ms_step']:.2f}", f"{x['roofline_ms']:.3f}", f"{x['GBps']:.0f}",
             f"{x['pct_copy']:.1f} %"] for x in r.data.get("rows", [])]
    if rows:
        out += _table(["engine", "KV", "batch", "mean context", "weights MB", "KV MB", "ms/step",
                       "roofline ms/step", "GB/s", "% of copy BW"], rows)
    return out


def _verdict(measured: int, predicted: int, slack: int) -> str:
    if measured > predicted:
        return f"**prediction too small** by {(measured - predicted) / MIB:.0f} MiB"
    if measured > predicted - slack:
        return "covered only by the allocator slack"
    return "covered"


def reserve(r: StepResult) -> list[str]:
    out = ["### 6. The plan's reserve vs the measured peak", "", *_status(r)]
    p = r.data.get("predicted")
    if not p:
        return out
    pred, slack = p["reserve"], p["slack"]
    out += [(f"`reserve_bytes` for the largest step ({p['max_prefill_tokens']} prefill tokens, "
             f"{p['max_batch_size']} sequences, tp 1): {pred / MIB:.1f} MiB = {(pred - slack) / MIB:.1f} MiB "
             f"activations + logits + {slack / MIB:.0f} MiB allocator slack. Measured: peak above the memory held "
             "after loading (weights + KV cache), `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` "
             "after `reset_peak_memory_stats()`; the first row is the first forward after loading."), ""]
    rows = []
    for x in r.data.get("rows", []):
        label = SCENARIOS[x["scenario"]].format(p=p["max_prefill_tokens"], b=p["max_batch_size"])
        res = "–" if x["reserved"] is None else f"{x['reserved'] / MIB:.1f}"
        rows.append([label, f"{x['allocated'] / MIB:.1f}", res, f"{x['allocated'] / pred:.2f}",
                     f"{x['allocated'] / max(1, pred - slack):.2f}", _verdict(x["allocated"], pred, slack)])
    return out + _table(["step", "peak allocated MiB", "peak reserved MiB", "measured / predicted",
                         "measured / (predicted − slack)", "verdict"], rows)


def summary(results: list[StepResult]) -> list[str]:
    rows = [[r.title, r.status.upper() if r.status == "fail" else r.status, f"{r.seconds:.1f}",
             "–" if r.limit_s is None else f"{r.limit_s:.0f}", r.note.replace("|", "/")[:160]] for r in results]
    return ["### Summary", "", *_table(["step", "status", "seconds", "time limit s", "note"], rows)]


def render(results: dict[str, StepResult], meta: dict) -> str:
    """The whole report; ``results`` holds every step, run or not."""
    r = results
    head = [f"## GPU check ({meta['device_name']}, {meta['date']})", "",
            f"`{meta['command']}`; model: {meta['model_label']}." + (" **Dry run on the CPU: tiny sizes, no figure "
                                                                      "here means anything.**" if meta["dry_run"] else ""),
            ""]
    kernels = bench_kernels(r["bench_attention"], r["bench_w4a16"], r["bench_moe"])
    body = (device(r["device"]) + kernel_tests(r["kernel_tests"]) + kernels
            + decode(r["decode_tprun"], r["decode_hf"], meta) + roofline(r["roofline"]) + reserve(r["reserve"])
            + summary(list(results.values())))
    return "\n".join(head + body).rstrip() + "\n"
