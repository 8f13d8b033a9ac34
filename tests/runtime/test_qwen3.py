"""Qwen3: per-head q/k RMSNorm before RoPE, and a head_dim that is not hidden / heads (32 x 4 heads = 128
against hidden 64 here, as Qwen3-0.6B's 16 x 128 against 1024). Tiny random checkpoints saved by
transformers: shards reassemble bit for bit, logits and greedy tokens match transformers at every tp."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from converter.verify import verify
from formats.manifest import load_manifest
from tests.runtime.parity import check_parity, int8_kv_and_bf16, random_prompt, reference
from tests.workspace import bits_equal, reassemble, source_state

BF16_LOGIT_ATOL = 0.05
KW = {"heads": 4, "kv_heads": 2, "hidden": 64, "head_dim": 32, "vocab": 301}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("qwen3")
    return root, reference(make_tiny(root / "src", "qwen3", num_layers=3, seed=9, **KW), random_prompt(21, 4))


@pytest.mark.parametrize("style,fmt,tie", [("v5", "safetensors", False), ("v4", "bin", True)])
def test_qwen3_shards_reassemble_bit_for_bit(tiny, tmp_path, style, fmt, tie):
    src = tiny("qwen3", style=style, fmt=fmt, tie=tie, shards=2, **KW)
    expected = source_state(src)
    for tp in (1, 2, 4):
        ws = tmp_path / f"tp{tp}"
        convert(ConvertOptions(src, ws, tp))
        m = load_manifest(ws)
        assert m.model.qk_norm and m.model.head_dim == 32 and not m.model.qkv_bias
        got = reassemble(ws)
        assert set(got) == set(expected) - ({"lm_head.weight"} if tie else set())
        assert all(bits_equal(t, expected[n]) for n, t in got.items())
        assert verify(ws) == []
        q_norm = [t for t in m.ranks[-1].tensors if t.name == "layers.0.attention.q_norm.weight"]
        assert q_norm and q_norm[0].shape == (32,)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_qwen3_logits_and_greedy_match_transformers(qwen3, tp, pp):
    root, ref = qwen3
    check_parity(ref, root / f"tp{tp}pp{pp}", tp, pp)


def test_qwen3_int8_kv_and_bf16(qwen3, tmp_path):
    _, ref = qwen3
    int8, bf16, ref_bf16 = int8_kv_and_bf16(ref, tmp_path / "ws")
    assert (int8.argmax(-1) == ref.logits.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(int8, ref.logits, atol=0.05, rtol=0)
    torch.testing.assert_close(bf16, ref_bf16, atol=BF16_LOGIT_ATOL, rtol=0)


def test_sliding_window_on_some_layers_matches_transformers(tiny, tmp_path):
    """max_window_layers: layers from it on slide (window 6 here), the others see everything."""
    src = tiny("qwen3", num_layers=3, seed=5, extra_config={"use_sliding_window": True, "sliding_window": 6,
                                                            "max_window_layers": 1}, **KW)
    check_parity(reference(src, list(range(3, 30))), tmp_path / "ws", 2, chunk=5)
    assert load_manifest(tmp_path / "ws").model.layer_types == ("full_attention", "sliding_attention",
                                                                 "sliding_attention")
