"""Runtime fixtures: what the real SmolLM2 generates, for detokenization tests (slow to build)."""
from __future__ import annotations

import pytest
import torch

GENERATION_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
]
GENERATION_CHATS = [
    "What is the capital of France? Answer in one sentence.",
    "Write 'thank you' in Japanese, Chinese, Korean and Russian, each with an emoji.",
    "List three French words with accents, like café.",
]
NEW_TOKENS = 48


@pytest.fixture(scope="session")
def smol_generated(smollm2) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids) of SmolLM2 for plain and chat prompts, greedy and sampled (sampling
    wanders into rarer tokens: byte pieces of multi-byte characters, odd whitespace). Chat answers
    usually end with <|im_end|>, so special tokens are in there too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tok(p)["input_ids"] for p in GENERATION_PROMPTS]
    prompts += [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"] for c in GENERATION_CHATS]
    # One left-padded batch per mode: 2 x NEW_TOKENS forward steps in all (a CPU minute, not ten).
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = []
    torch.manual_seed(0)
    with torch.no_grad():
        for sample in (False, True):
            settings = {"do_sample": False}
            if sample:
                settings = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id,
                                 **settings)
            for prompt, row in zip(prompts, gen[:, width:].tolist()):
                end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
                out.append((prompt, row[:end]))  # after EOS a finished row holds only padding
    return out
