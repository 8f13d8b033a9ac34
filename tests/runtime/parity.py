"""What every model-family test asks: transformers' logits and greedy tokens for a prompt, and tprun's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams

LOGIT_ATOL = 1e-4  # fp32 on both sides; tp > 1 sums partial matmuls in another order than one matmul


@dataclass(frozen=True)
class Reference:
    src: Path
    prompt: list[int]
    logits: torch.Tensor  # (T, vocab), float32
    greedy: list[int]


def reference(src: Path, prompt: list[int], new_tokens: int = 12, dtype: torch.dtype = torch.float32) -> Reference:
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    return Reference(Path(src), prompt, logits, greedy)


def random_prompt(n: int, seed: int, vocab: int = 301) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_parity(ref: Reference, ws: Path, tp: int, pp: int = 1, chunk: int | None = None, ep: bool = False,
                 **settings) -> LLM:
    """Convert at tp x pp (``ep``: experts whole per rank), then logits (whole prompt, and chunked when asked) and
    greedy tokens as transformers."""
    convert(ConvertOptions(ref.src, ws, tp, pp=pp, ep=ep))
    with LLM(ws, device="cpu", **settings) as llm:
        torch.testing.assert_close(llm.prompt_logits(ref.prompt), ref.logits, atol=LOGIT_ATOL, rtol=0)
        if chunk:
            torch.testing.assert_close(llm.prompt_logits(ref.prompt, chunk=chunk), ref.logits, atol=LOGIT_ATOL, rtol=0)
        out = llm.generate(ref.prompt, SamplingParams(temperature=0, max_tokens=len(ref.greedy), ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref.greedy, f"tp={tp} pp={pp}"
    return llm


def int8_kv_and_bf16(ref: Reference, ws: Path, tp: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert at ``tp``; tprun's prompt logits with int8 KV, its bf16 logits, and transformers' bf16 logits."""
    convert(ConvertOptions(ref.src, ws, tp))
    with LLM(ws, device="cpu", kv_dtype="int8") as llm:
        int8 = llm.prompt_logits(ref.prompt)
    with LLM(ws, device="cpu", dtype="bfloat16") as llm:
        bf16 = llm.prompt_logits(ref.prompt)
    return int8, bf16, reference(ref.src, ref.prompt, 1, torch.bfloat16).logits
