"""Tiny random Llama / Mistral / Qwen2 through the real runtime at tp 1, 2, 4: logits match transformers."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams

# fp32 end to end; tp > 1 sums partial matmuls across ranks in a different order than one matmul.
LOGIT_ATOL = 1e-4
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
CASES = [  # arch, heads, kv_heads, tie, rope_scaling
    ("llama", 4, 2, False, LLAMA3_SCALING),
    ("mistral", 4, 1, True, None),
    ("qwen2", 4, 4, False, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-h{c[1]}-kv{c[2]}-{'tied' if c[3] else 'untied'}")
def test_logits_match_transformers_at_every_tp(tiny, tmp_path, case):
    arch, heads, kv, tie, scaling = case
    src = tiny(arch, heads=heads, kv_heads=kv, tie=tie, rope_scaling=scaling, vocab=301, seed=7)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    prompt = torch.randint(3, 301, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]  # (T, V)
        ref_greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    for tp in (1, 2, 4):  # kv_heads 1 and 2 < 4: replicated KV heads
        convert(ConvertOptions(src, tmp_path / f"ws{tp}", tp))
        with LLM(tmp_path / f"ws{tp}", device="cpu") as llm:
            logits = llm.prompt_logits(prompt)
            out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        torch.testing.assert_close(logits, ref, atol=LOGIT_ATOL, rtol=0, msg=lambda m: f"tp={tp}: {m}")
        assert out.outputs[0].token_ids == ref_greedy, f"tp={tp}"


# bf16 keeps 8 mantissa bits: logits of magnitude ~1 differ by a few bf16 ulps between summation orders.
BF16_LOGIT_ATOL = 0.05


def test_bf16_on_cpu_matches_transformers_bf16(tiny, tmp_path):
    src = tiny("qwen2", heads=4, kv_heads=2, dtype=torch.bfloat16, vocab=301, seed=11)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    prompt = list(range(5, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    with LLM(tmp_path / "ws", device="cpu") as llm:
        assert llm.driver.runner.model.embed.dtype == torch.bfloat16
        logits = llm.prompt_logits(prompt)
    torch.testing.assert_close(logits, ref, atol=BF16_LOGIT_ATOL, rtol=0)
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
