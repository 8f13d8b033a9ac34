"""Generation speed of tprun beside transformers ``generate``, same model, same machine, same run.

Measures (each engine in a fresh process, so start-up is honest):
- start-up: from process creation to the first generated token (tprun: workspace mapping, rank
  processes, tokenizer; transformers: ``from_pretrained`` then ``generate``);
- decode throughput: generated tokens/s at batch 1 and 8 with 128 new tokens (greedy, no EOS stop),
  after one warm-up call.
Prints ratios tprun / transformers. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at", "In 1492, Columbus", "A good recipe for bread",
           "The theory of relativity says"]
NEW_TOKENS = 128


def _since_process_start() -> float:
    import psutil
    return time.time() - psutil.Process().create_time()


def child_tprun(ws: str) -> dict:
    from runtime.api import LLM
    from runtime.engine.sampling import SamplingParams

    first: list[float] = []
    with LLM(ws, device="cpu") as llm:
        llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=1),
                     on_delta=lambda s, d: first or first.append(_since_process_start()))
        result = {"first_token_s": first[0]}
        for batch in (1, 8):
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
            t = time.perf_counter()
            outs = llm.generate(PROMPTS[:batch], params)
            result[f"tok_s_b{batch}"] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    return result


def child_hf(src: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src, padding_side="left")
    with torch.no_grad():
        model.generate(**tok(PROMPTS[:1], return_tensors="pt"), max_new_tokens=1, do_sample=False)
        result = {"first_token_s": _since_process_start()}
        for batch in (1, 8):
            enc = tok(PROMPTS[:batch], return_tensors="pt", padding=True)
            t = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            result[f"tok_s_b{batch}"] = batch * (out.shape[1] - enc.input_ids.shape[1]) / (time.perf_counter() - t)
    return result


def _run_child(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.bench.bench_generate", "--child", kind, str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from tests.fixtures.smollm2 import smollm2_path

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args()
    if args.child:
        kind, path = args.child
        print(json.dumps(child_tprun(path) if kind == "tprun" else child_hf(path)))
        return
    src = smollm2_path()
    rows = [("transformers generate", _run_child("hf", src))]
    with tempfile.TemporaryDirectory() as tmp:
        for tp in (1, 3):
            ws = Path(tmp) / f"tp{tp}"
            subprocess.run([sys.executable, "-m", "converter", "convert", str(src), "-o", str(ws), "--tp", str(tp)],
                           check=True, capture_output=True)
            rows.append((f"tprun tp={tp}", _run_child("tprun", ws)))
    _report(rows, args.markdown)


def _report(rows: list[tuple[str, dict]], markdown: Path | None) -> None:
    base = rows[0][1]
    lines = ["| engine (SmolLM2-135M, fp32, CPU) | start → first token | tok/s batch 1 | tok/s batch 8 | "
             "ratio b1 | ratio b8 |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['first_token_s']:.2f} s | {r['tok_s_b1']:.1f} | {r['tok_s_b8']:.1f} | "
                     f"{r['tok_s_b1'] / base['tok_s_b1']:.2f}× | {r['tok_s_b8'] / base['tok_s_b8']:.2f}× |")
    print("\n".join(lines))
    if markdown:
        markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
