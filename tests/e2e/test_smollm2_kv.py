"""KV precision on the real SmolLM2: perplexity through `tprun perplexity`, and greedy agreement."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.api import LLM
from runtime.config import CacheConfig
from runtime.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "tests" / "data" / "english.txt"  # ~2,900 words of ordinary English, ~3,400 tokens
# Perplexity change vs fp32 KV: the issues' targets. Measured on this text: int8 +0.03 %, int4 +1.9 %
# (per-channel keys per block, clipped; rotated values; docs/kv-cache.md).
MAX_PPL_CHANGE = {"int8": 0.005, "int4": 0.03}
# (logit gap between fp32's two best tokens below which a divergence counts as a near tie, prompts that must
# give fp32's 32 tokens). int8 KV moves SmolLM2's logits by 0.03 on average (0.45 at most) on english.txt.
# Measured under each fp32 GEMM the CPU path can run (TPDEPLOY_CPU_DENSE native / onednn / plain: the same
# math in three summation orders, which moves which int4 rounding flips): int8 6 / 4 / 4 of 8 prompts
# identical, the rest part at gaps <= 0.07; int4 1 / 2 / 0 identical, the rest at gaps <= 0.61 / 0.23 / 0.29.
# So int4 asserts no count, only the gap, which still tells it from the per-token int4 it replaced (0 of 8,
# gaps up to 1.56).
GREEDY = {"int8": (0.1, 4), "int4": (0.8, 0)}
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "The best way to learn a new language is",
    "In 1969, the first humans",
    "A recipe for pancakes: first,",
]


def _perplexity(ws: Path, kv: str) -> dict:
    cmd = [sys.executable, "-m", "runtime", "perplexity", str(ws), "--file", str(TEXT), "--device", "cpu",
           "--kv-dtype", kv, "--context", "512", "--prefill-chunk", "192", "--kv-cache-tokens", "512", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def perplexities(smollm2_ws):
    return {kv: _perplexity(smollm2_ws[1], kv) for kv in ("auto", "int8", "int4")}


def test_perplexity_through_the_serving_path(perplexities):
    base = perplexities["auto"]
    assert base["kv_dtype"] == "fp32" and base["windows"] == 6 and base["scored_tokens"] == 6 * 255
    assert 5 < base["perplexity"] < 40  # a 135M instruct model on plain English
    print({kv: round(r["perplexity"], 4) for kv, r in perplexities.items()})
    for kv, limit in MAX_PPL_CHANGE.items():
        change = perplexities[kv]["perplexity"] / base["perplexity"] - 1
        assert perplexities[kv]["kv_dtype"] == kv
        assert 0 < abs(change) <= limit, f"{kv}: {change:+.2%}"


@pytest.mark.parametrize("kv", list(GREEDY))
def test_quantized_kv_greedy_output_matches_fp32_except_at_near_ties(kv, llms, smollm2_ws):
    """Prompts that part ways from fp32's greedy tokens do so where fp32's two best logits are close, a coin
    flip that rounding can turn (GREEDY says how close, and how many prompts must not part at all)."""
    near_tie, min_same = GREEDY[kv]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = llms[1].generate(GREEDY_PROMPTS, params)
    with LLM(smollm2_ws[1], device="cpu", cache=CacheConfig(kv, kv_cache_tokens=8 * 64)) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(GREEDY_PROMPTS, params)]
    same = 0
    for r, g in zip(ref, got):
        a = r.outputs[0].token_ids
        first = next((i for i, (x, y) in enumerate(zip(a, g)) if x != y), None)
        if first is None:
            same += 1
            continue
        top2 = llms[1].prompt_logits(r.prompt_token_ids + a[:first])[-1].topk(2).values
        assert top2[0] - top2[1] < near_tie, f"{r.prompt!r} diverged at token {first} with a clear winner"
    print(f"{kv} KV: {same}/{len(GREEDY_PROMPTS)} prompts give fp32's 32 greedy tokens")
    assert same >= min_same


def test_perplexity_refuses_a_text_shorter_than_a_window(smollm2_ws, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.")
    out = subprocess.run([sys.executable, "-m", "runtime", "perplexity", str(smollm2_ws[1]), "--file", str(short),
                          "--device", "cpu", "--kv-cache-tokens", "512"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "fewer than one window of --context 512" in out.stderr
