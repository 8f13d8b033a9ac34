"""Real int4 SmolLM2 workspaces (AutoAWQ, compressed-tensors) run through the runtime's torch int4
path at tp 1 and 3 and give the logits and greedy tokens of the dequantized model in transformers."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams
from tests.workspace import source_state

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
# Both sides hold identical fp32 weights (the tool's dequantization in the scales' dtype, widened
# exactly); what differs is summation order (fused qkv/gate_up, the tp 3 all-reduce), as in the
# dense fp32 tests.
LOGIT_ATOL = 2e-4
PACKED = ("qweight", "qzeros", "scales", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _checkpoint(kind: str):
    from tests.fixtures.quantized import awq_smollm2_path, ct_smollm2_path

    return awq_smollm2_path() if kind == "awq" else ct_smollm2_path(symmetric=False)


def _dequantized_hf(src, smollm2, scale_dtype: torch.dtype):
    from transformers import AutoConfig, LlamaForCausalLM

    from tests.fixtures.quantized import reference_dequant

    model = LlamaForCausalLM(AutoConfig.from_pretrained(smollm2)).float().eval()
    state = {k: v.float() for k, v in source_state(src).items() if not k.endswith(PACKED)}
    state.update({k: v.to(scale_dtype).float() for k, v in reference_dequant(src).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied
    return model


@pytest.mark.parametrize("kind,tp,scale_dtype", [("awq", 1, torch.float16), ("awq", 3, torch.float16),
                                                 ("ct-asym", 3, torch.bfloat16)], ids=["awq-tp1", "awq-tp3", "ct-tp3"])
def test_int4_logits_and_tokens_match_dequantized_model(smollm2, tmp_path, kind, tp, scale_dtype):
    src = _checkpoint(kind)
    hf = _dequantized_hf(src, smollm2, scale_dtype)
    convert(ConvertOptions(src, tmp_path / "ws", tp))
    with LLM(tmp_path / "ws", device="cpu", dtype="float32") as llm:
        ids = llm.tokenizer.encode(PROMPT)
        logits = llm.prompt_logits(ids)
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        ref_tokens = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    torch.testing.assert_close(logits, ref, atol=LOGIT_ATOL, rtol=0)
    assert out.token_ids == ref_tokens
    assert "Paris" in out.text


@pytest.mark.parametrize("kind,tp", [("awq", 1), ("ct-asym", 3)], ids=["awq-tp1", "ct-tp3"])
def test_bf16_runs_the_packed_cpu_kernel_within_bf16_of_the_reference(tmp_path, kind, tp, capfd, monkeypatch):
    """A bf16 model on CPU takes torch's packed int4 kernel (said on stderr); its logits stay within bf16
    W4A16 error of the per-call reference path and it still answers."""
    convert(ConvertOptions(_checkpoint(kind), tmp_path / "ws", tp))
    runs = {}
    for mode in ("auto", "reference"):
        monkeypatch.setenv("TPDEPLOY_CPU_INT4", mode)
        with LLM(tmp_path / "ws", device="cpu", dtype="bfloat16") as llm:
            ids = llm.tokenizer.encode(PROMPT)
            logits = llm.prompt_logits(ids)
            text = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
        runs[mode] = (logits, text, capfd.readouterr().err)
    (packed, text, said), (ref, _, ref_said) = runs["auto"], runs["reference"]
    assert "int4 linears on CPU: torch's packed int4 kernel, bf16 activations" in said
    assert "dequantized on every call" in ref_said
    assert ((packed - ref).abs().max() / ref.abs().max()).item() < 0.05
    assert (packed.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8 and "Paris" in text
