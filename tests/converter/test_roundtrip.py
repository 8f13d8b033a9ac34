"""Shards reassembled across ranks reproduce every source tensor bit for bit."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from converter.verify import verify
from formats.manifest import load_manifest
from tests.workspace import bits_equal, reassemble, source_state

CASES = [  # (arch, kv_heads, tie, fmt, shards, style)
    ("llama", 2, False, "safetensors", 1, "v5"),
    ("llama", 4, True, "safetensors", 3, "v4"),
    ("mistral", 1, False, "bin", 1, "v4"),
    ("mistral", 2, True, "bin", 2, "v5"),
    ("qwen2", 2, False, "safetensors", 2, "v5"),
    ("qwen2", 1, True, "bin", 1, "v4"),
]


def _id(case):
    arch, kv, tie, fmt, shards, style = case
    return f"{arch}-kv{kv}-{'tied' if tie else 'untied'}-{fmt}x{shards}-{style}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_tiny_reassembles_bit_for_bit(tiny, tmp_path, case, dtype):
    arch, kv, tie, fmt, shards, style = case
    src = tiny(arch, kv_heads=kv, tie=tie, dtype=dtype, fmt=fmt, shards=shards, style=style, vocab=253)
    expected = source_state(src)
    for tp in (1, 2, 4):  # kv_heads 1 and 2 < tp 4: replicated KV heads
        ws = tmp_path / f"ws{tp}"
        convert(ConvertOptions(src, ws, tp))
        got = reassemble(ws)
        assert set(got) == set(expected) - ({"lm_head.weight"} if tie else set())
        for name, tensor in got.items():
            assert bits_equal(tensor, expected[name]), f"tp={tp}: {name} differs"
        assert verify(ws) == []
        m = load_manifest(ws)
        assert m.model.qkv_bias == (arch == "qwen2") and m.model.tie_word_embeddings == tie
        if tp > 1:  # vocab-parallel: no rank holds the whole embedding
            assert all(t.shape[0] < 253 for r in m.ranks for t in r.tensors if t.name == "tok_embeddings.weight")


def test_dtype_option_casts(tiny, tmp_path):
    src = tiny("llama", dtype=torch.float32)
    convert(ConvertOptions(src, tmp_path / "ws", 2, dtype="bfloat16"))
    got, expected = reassemble(tmp_path / "ws"), source_state(src)
    assert load_manifest(tmp_path / "ws").weights.dtype == "bfloat16"
    for name, tensor in got.items():
        assert bits_equal(tensor, expected[name].to(torch.bfloat16)), name


def test_v4_and_v5_configs_normalize_identically(tiny, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    models = {}
    for style in ("v4", "v5"):
        src = tiny("llama", style=style, rope_scaling=scaling, seed=3)
        convert(ConvertOptions(src, tmp_path / style, 1))
        models[style] = load_manifest(tmp_path / style).model
    assert models["v4"] == models["v5"]
    assert models["v5"].rope_scaling.rope_type == "llama3" and models["v5"].rope_scaling.factor == 8.0
