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
from tests.runtime.parity import check_parity, random_prompt, reference
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
    src, prompt, ref_logits = r.src, r.prompt, r.logits
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    with LLM(tmp_path / "ws", device="cpu", kv_dtype="int8") as llm:
        logits = llm.prompt_logits(prompt)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.9
    ref = reference(src, prompt, 1, torch.bfloat16).logits
    with LLM(tmp_path / "ws", device="cpu", dtype="bfloat16") as llm:
        ours = llm.prompt_logits(prompt)
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
    assert out.exit_code == 2 and message in out.output, out.output
