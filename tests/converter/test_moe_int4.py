"""int4 mixtures of experts: AutoAWQ and compressed-tensors W4A16 checkpoints whose experts are quantized one by
one (the router kept dense, as the tools do) convert into the canonical int4 layout with every expert's weights
dequantizing bit for bit at tp 1/2 and ep 2, and tprun on them computes what transformers computes with the
weights dequantized."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from converter.verify import verify
from tests.converter.quant_parity import matches_dequantized
from tests.fixtures.int4_pack import fuse_experts, make_tiny_awq, make_tiny_ct, tiny_reference
from tests.workspace import bits_equal, int4_slices, source_state

SHAPES = dict(num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=200)
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "norm_topk_prob": True,
       "mlp_only_layers": [1]}
FORMATS = {"awq": make_tiny_awq, "ct": lambda d, **kw: make_tiny_ct(d, symmetric=False, **kw)}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_int4_experts_dequantize_exactly_at_tp_and_ep(tmp_path, kind):
    src = FORMATS[kind](tmp_path / "src", arch="qwen3_moe", extra_config=MOE, **SHAPES)
    reference = {k: v.to(torch.float16).float() for k, v in tiny_reference(src).items()}  # rounded as the tools do
    assert any(".experts.3.down_proj" in n for n in reference)
    for tp, ep in ((1, False), (2, False), (2, True)):
        ws = tmp_path / f"ws{tp}{ep}"
        convert(ConvertOptions(src, ws, tp, ep=ep))
        seen = set()
        for rank, source, got, (axis, (a, b)) in int4_slices(ws):
            want = reference[source].float().narrow(axis, a, b - a)
            assert bits_equal(got.contiguous(), want.contiguous()), f"tp={tp} ep={ep} rank={rank} {source}"
            seen.add(source)
        assert seen == set(reference)
        assert verify(ws) == []


@pytest.mark.parametrize("kind,ep", [("awq", True), ("ct", False)])
def test_int4_experts_run_like_transformers_on_the_dequantized_weights(tmp_path, kind, ep):
    src = FORMATS[kind](tmp_path / "src", arch="qwen3_moe", extra_config=MOE, **SHAPES)
    dense = {n: t.float() for n, t in source_state(src).items() if n.endswith((".weight", ".bias"))}
    dense.update({n: t.to(torch.float16).float() for n, t in tiny_reference(src).items()})  # as tprun rounds them
    matches_dequantized(src, fuse_experts(dense), tmp_path, tps=(2,), ep=ep)
