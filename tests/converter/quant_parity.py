"""One check for every weight format: the runtime on a converted quantized checkpoint computes what
transformers computes with the weights dequantized by the format's own definition."""
from pathlib import Path

import torch

from converter.convert import ConvertOptions, convert


def matches_dequantized(src: Path, dense_state: dict[str, torch.Tensor], tmp_path: Path, tps=(1, 2),
                        atol: float = 1e-4, ep: bool = False) -> None:
    """``dense_state``: the checkpoint's float tensors plus the dequantized linears, by HF name. Logits at
    every prompt position (within ``atol``: float32 on both sides, summed in other orders) and 6 greedy
    tokens must match at each tp."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from runtime.api import LLM, SamplingParams

    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).float().eval()
    missing, unexpected = hf.load_state_dict(dense_state, strict=False)
    assert not unexpected and all(n == "lm_head.weight" for n in missing), (missing, unexpected)
    prompt = list(range(3, 30))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
        greedy = list(prompt)
        for _ in range(6):  # plain argmax steps: no EOS handling to differ in
            greedy.append(int(hf(torch.tensor([greedy])).logits[0, -1].argmax()))
        greedy = greedy[len(prompt):]
    for tp in tps:
        convert(ConvertOptions(src, tmp_path / f"ws{tp}", tp, ep=ep))
        with LLM(tmp_path / f"ws{tp}", device="cpu", dtype="float32") as llm:
            torch.testing.assert_close(llm.prompt_logits(prompt), ref, atol=atol, rtol=0)
            out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            assert list(out[0].outputs[0].token_ids) == greedy, f"tp={tp}"
