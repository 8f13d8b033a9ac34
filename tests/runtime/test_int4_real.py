"""An AWQ SmolLM2 workspace runs through the runtime's torch int4 path at tp 1 and 3 and gives the
logits and greedy tokens of the dequantized model in transformers."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.sampling import SamplingParams
from tests.workspace import source_state

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
# Both sides hold identical fp32 weights (fp16 dequantization widened exactly); what differs is
# summation order (fused qkv/gate_up, and the tp 3 all-reduce), as in the dense fp32 tests.
LOGIT_ATOL = 2e-4


@pytest.fixture(scope="module")
def awq():
    from tests.fixtures.quantized import awq_smollm2_path

    return awq_smollm2_path()


@pytest.fixture(scope="module")
def dequantized_hf(awq, smollm2):
    """transformers' Llama with the AWQ tool's own dequantized weights (everything in fp32)."""
    from transformers import AutoConfig, LlamaForCausalLM

    from tests.fixtures.quantized import reference_dequant

    model = LlamaForCausalLM(AutoConfig.from_pretrained(smollm2)).float().eval()
    state = {k: v.float() for k, v in source_state(awq).items() if not k.endswith(("qweight", "qzeros", "scales"))}
    state.update({k: v.half().float() for k, v in reference_dequant(awq).items()})  # as AWQ computes: fp16
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied
    return model


@pytest.mark.parametrize("tp", [1, 3], ids=["tp1", "tp3"])
def test_awq_logits_and_tokens_match_dequantized_model(awq, dequantized_hf, tmp_path, tp):
    from tests.fixtures.smollm2 import smollm2_path  # noqa: F401  (the tokenizer is the same)

    convert(ConvertOptions(awq, tmp_path / "ws", tp))
    with LLM(tmp_path / "ws", device="cpu", dtype="float32") as llm:
        ids = llm.tokenizer.encode(PROMPT)
        logits = llm.prompt_logits(ids)
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        ref = dequantized_hf(torch.tensor([ids])).logits[0]
        ref_tokens = dequantized_hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                             eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    torch.testing.assert_close(logits, ref, atol=LOGIT_ATOL, rtol=0)
    assert out.token_ids == ref_tokens
    assert "Paris" in out.text
