"""Real 4-bit SmolLM2 checkpoints written by the quantization tools: every rank's int4 shard
dequantizes to exactly the tool's own dequantization of the same slice."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from converter.verify import verify
from formats.manifest import load_manifest
from tests.workspace import bits_equal, int4_slices, reassemble, source_state

pytestmark = pytest.mark.slow


def _sources():
    from tests.fixtures.quantized import awq_smollm2_path, ct_smollm2_path

    return {"awq": awq_smollm2_path, "ct-asym": lambda: ct_smollm2_path(symmetric=False),
            "ct-sym": lambda: ct_smollm2_path(symmetric=True)}


@pytest.mark.parametrize("tp", [1, 3], ids=["tp1", "tp3"])
@pytest.mark.parametrize("kind", ["awq", "ct-asym", "ct-sym"])
def test_int4_shards_equal_the_tools_dequantization(tmp_path, kind, tp):
    from tests.fixtures.quantized import reference_dequant

    src = _sources()[kind]()
    summary = convert(ConvertOptions(src, tmp_path / "ws", tp))
    # The tool's dequantization with fp32 scales is exact; the tool itself computes in the scales'
    # dtype, i.e. that exact product rounded once: that is what the canonical layout must reproduce.
    scale_dtype = getattr(torch, load_manifest(tmp_path / "ws").weights.quantization.scale_dtype)
    reference = {k: v.to(scale_dtype).float() for k, v in reference_dequant(src).items()}
    checked = set()
    for rank, source, got, (axis, (a, b)) in int4_slices(tmp_path / "ws"):
        expected = reference[source].narrow(axis, a, b - a)
        assert bits_equal(got.contiguous(), expected.contiguous()), f"rank {rank}: {source} {axis}:{a}-{b}"
        checked.add(source)
    assert len(checked) == 30 * 7  # every linear of every layer
    dense = reassemble(tmp_path / "ws")  # embeddings and norms: bit for bit
    state = source_state(src)
    assert [n for n, t in dense.items() if not n.endswith(".qweight") and not n.endswith((".scales", ".zeros"))
            and not bits_equal(t, state[n])] == []
    assert verify(tmp_path / "ws") == []
    m = load_manifest(tmp_path / "ws")
    assert m.weights.quantization.group_size == 64 and m.weights.quantization.zero_point == (kind != "ct-sym")
    assert all(t.quant is not None for r in m.ranks for t in r.tensors if t.name.endswith(".qweight"))
    sizes = summary.bytes_per_rank
    assert (max(sizes) - min(sizes)) / max(sizes) < 0.01
