"""Gemma 3 text models: (1 + w) RMSNorm in float32, four norms per layer, GeGLU (tanh), embeddings scaled by
sqrt(hidden), q/k norms, the softmax scale of query_pre_attn_scalar, and interleaved sliding (window 6,
RoPE base 10k) and global layers (base 1e6, linear scaling x8). Tiny random checkpoints saved by
transformers; logits and greedy tokens match transformers at every tp and across pipeline stages."""
import pytest
import torch
from click.testing import CliRunner

from converter.cli import main as tpconv
from converter.convert import ConvertOptions, convert
from converter.verify import verify
from formats.manifest import load_manifest
from runtime.api import LLM
from runtime.cli import main as runtime_cli
from runtime.engine.sampling import SamplingParams
from tests.runtime.parity import check_parity, int8_kv_and_bf16, random_prompt, reference
from tests.workspace import bits_equal, reassemble, source_state

BF16_STEPS = 4  # bf16 keeps 8 significant bits
TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
KW = {"num_layers": 4, "heads": 4, "kv_heads": 2, "hidden": 64, "head_dim": 32, "vocab": 301, "tie": True,
      "rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
      "extra_config": {"layer_types": TYPES, "sliding_window": 6, "query_pre_attn_scalar": 24}}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("gemma3")
    return root, reference(make_tiny(root / "src", "gemma3", seed=6, **KW), random_prompt(27, 8))


@pytest.mark.parametrize("style", ["v5", "v4"])
def test_gemma3_config_and_shards(tiny, tmp_path, style):
    src = tiny("gemma3", style=style, **KW)
    expected = source_state(src)
    for tp in (1, 2, 4):
        ws = tmp_path / f"{style}-tp{tp}"
        convert(ConvertOptions(src, ws, tp))
        m = load_manifest(ws).model
        assert (m.norm_offset, m.sandwich_norms, m.hidden_act, m.embed_scale) == (True, True, "gelu_tanh", True)
        assert m.layer_types == tuple(TYPES) and m.sliding_window == 6 and m.local_rope_theta == 10000.0
        assert m.rope_theta == 1e6 and m.rope_scaling.factor == 8.0 and m.query_scale == 24 ** -0.5
        got = reassemble(ws)
        assert set(got) == set(expected) and all(bits_equal(t, expected[n]) for n, t in got.items())
        assert verify(ws) == []


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_gemma3_logits_and_greedy_match_transformers(gemma, tp, pp):
    root, ref = gemma
    check_parity(ref, root / f"tp{tp}pp{pp}", tp, pp, chunk=5)


def test_gemma3_bf16_and_int8_kv(gemma, tmp_path):
    _, r = gemma
    int8, ours, ref = int8_kv_and_bf16(r, tmp_path / "ws")
    assert (int8.argmax(-1) == r.logits.argmax(-1)).float().mean() > 0.9
    # Logits reach ~125 here (tied embeddings scaled by sqrt(hidden)), where one bf16 step is 0.5: allow a
    # few steps at the largest magnitude, as transformers' own bf16 run differs from its fp32 one by 0.67.
    assert (ours - ref).abs().max() <= BF16_STEPS * 2 ** -8 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("field,value,message", [
    ("final_logit_softcapping", 30.0, "field 'final_logit_softcapping' is 30.0: logit soft-capping is not supported"),
    ("attn_logit_softcapping", 50.0, "field 'attn_logit_softcapping' is 50.0"),
    ("hidden_activation", "relu", "field 'hidden_activation' is 'relu'"),
])
def test_gemma3_variants_are_refused_naming_the_field(tiny, tmp_path, field, value, message):
    src = tiny("gemma3", **{**KW, "extra_config": {**KW["extra_config"], field: value}})
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "ws")])
    assert out.exit_code == 3 and message in out.output, out.output  # a checkpoint tpconv cannot read


def test_gemma3_image_text_checkpoint_converts_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration (4B-27B): the language model is converted, the vision tower left out and
    said so; text-only logits and greedy tokens equal transformers' image-text model fed text."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from tests.fixtures.tiny import tiny_config, tiny_model, tiny_tokenizer

    text = tiny_config("gemma3", **{k: v for k, v in KW.items() if k != "tie"})
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the text model's weights as the tiny text-only model would have them
        own = tiny_model(text, seed=4).state_dict()
        for name, param in model.model.language_model.named_parameters():
            param.copy_(own["model." + name])
    src = tmp_path / "src"
    model.save_pretrained(src)
    tiny_tokenizer(301).save_pretrained(src)
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "ws"), "--tp", "2"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "Gemma3ForConditionalGeneration: converting its text model; the vision tower and projector" in out.output
    assert "is not used" not in out.output
    assert load_manifest(tmp_path / "ws").model.architecture == "Gemma3ForConditionalGeneration"
    prompt = random_prompt(20, 3, vocab=296)
    with torch.no_grad():
        ref_logits = model(input_ids=torch.tensor([prompt])).logits[0]
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    with LLM(tmp_path / "ws", device="cpu") as llm:
        torch.testing.assert_close(llm.prompt_logits(prompt), ref_logits, atol=1e-4, rtol=0)
        got = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    assert got.token_ids == greedy


def test_plan_says_what_sliding_layers_cost(gemma):
    root, ref = gemma
    convert(ConvertOptions(ref.src, root / "plan-ws", 1))
    out = CliRunner().invoke(runtime_cli, ["plan", str(root / "plan-ws"), "--gpu-mem", "1GiB"])
    assert out.exit_code == 0, out.output
    assert "sliding  3 of 4 layers attend to the last 6 tokens only" in out.output and "4.0x the tokens" in out.output
