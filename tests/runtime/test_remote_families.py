"""Baichuan-7B / Baichuan2-7B and InternLM2 (remote-code families, no transformers class): written in
their own tensor names by ``tests.fixtures.remote_code``; the reference forward is a transformers Llama
holding the same weights unfused (and, for Baichuan2, NormHead's normalised lm_head)."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from converter.cli import main as tpconv
from converter.convert import ConvertOptions, convert
from converter.verify import verify
from formats.manifest import load_manifest
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams
from tests.fixtures.remote_code import make_remote
from tests.workspace import bits_equal, reassemble

LOGIT_ATOL = 1e-4

CASES = {  # id -> (family, kwargs, tp values)
    "baichuan": ("baichuan", {"heads": 4}, (1, 2, 4)),
    "baichuan2": ("baichuan", {"heads": 4, "baichuan2": True}, (1, 2)),
    "internlm2-kv2": ("internlm2", {"heads": 4, "kv_heads": 2}, (1, 2, 4)),
    "internlm2-kv1": ("internlm2", {"heads": 8, "kv_heads": 1, "hidden": 64}, (1, 2, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_family_matches_its_llama_reference(tmp_path, case):
    family, kw, tps = CASES[case]
    src, ref_dir = make_remote(tmp_path, family, seed=3, **kw)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    vocab = ref.config.vocab_size
    prompt = torch.randint(3, 250, (17,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt])).logits[0]
        greedy = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    for tp in tps:
        ws = tmp_path / f"tp{tp}"
        convert(ConvertOptions(src, ws, tp))
        _check_shards(ws, src, ref_dir, family)
        with LLM(ws, device="cpu") as llm:
            torch.testing.assert_close(llm.prompt_logits(prompt), ref_logits[:, :vocab], atol=LOGIT_ATOL, rtol=0)
            out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
        assert out.outputs[0].token_ids == greedy, f"{case} tp={tp}"


def _check_shards(ws, src, ref_dir, family: str) -> None:
    """Reassembled rows of the fused tensor (``NAME#q`` pieces) equal the reference's unfused q/k/v."""
    assert verify(ws) == []
    got, ref = reassemble(ws), load_file(ref_dir / "model.safetensors")
    fused = "self_attn.W_pack.weight" if family == "baichuan" else "attention.wqkv.weight"
    for part in "qkv":
        name = f"model.layers.1.{fused}#{part}"
        assert bits_equal(got[name], ref[f"model.layers.1.self_attn.{part}_proj.weight"]), name
    head = "lm_head.weight" if family == "baichuan" else "output.weight"
    assert bits_equal(got[head], ref["lm_head.weight"])  # Baichuan2: normalised at conversion, as NormHead does
    assert load_manifest(ws).model.architecture in ("BaichuanForCausalLM", "InternLM2ForCausalLM")


def test_baichuan_13b_alibi_and_int4_fused_are_refused(tmp_path):
    src, _ = make_remote(tmp_path, "baichuan")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["max_position_embeddings"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "ws")])
    assert out.exit_code == 3 and "Baichuan-13B, which uses ALiBi" in out.output, out.output
    cfg["max_position_embeddings"] = 64
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                  "version": "gemm"}
    (src / "config.json").write_text(json.dumps(cfg))
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "ws")])
    assert out.exit_code == 3 and "quantized BaichuanForCausalLM checkpoints are not supported" in out.output, out.output


def test_internlm2_with_biases_is_refused(tmp_path):
    src, _ = make_remote(tmp_path, "internlm2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["bias"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "ws")])
    assert out.exit_code == 3 and "field 'bias' is true" in out.output, out.output
