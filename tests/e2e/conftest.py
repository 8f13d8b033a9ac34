"""Workspaces of the real SmolLM2 at tp 1 and 3, and running LLMs over them, shared per session."""
import pytest
import torch

from converter.convert import ConvertOptions, convert


@pytest.fixture(scope="session")
def smollm2_ws(smollm2, tmp_path_factory):
    """tp -> workspace path (converted once per test session)."""
    root = tmp_path_factory.mktemp("smollm2-ws")
    return {tp: convert(ConvertOptions(smollm2, root / f"tp{tp}", tp)) and root / f"tp{tp}" for tp in (1, 3)}


@pytest.fixture(scope="package")  # closed after tests/e2e: a process holds one multi-rank LLM at a time
def llms(smollm2_ws):
    from runtime.api import LLM

    started = {tp: LLM(ws, device="cpu") for tp, ws in smollm2_ws.items()}
    yield started
    for llm in started.values():
        llm.close()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def reference(hf_smollm2):
    """prompt -> (prompt ids, transformers' greedy NEW_TOKENS tokens with EOS ignored, last-position logits)."""
    from tests.e2e.prompts import NEW_TOKENS, PROMPTS

    model, tok = hf_smollm2
    out = {}
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2)
            out[p] = (ids[0].tolist(), gen[0, ids.shape[1]:].tolist(), model(ids).logits[0, -1])
    return out
