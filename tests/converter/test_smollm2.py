"""The real SmolLM2-135M-Instruct: bit-for-bit shards at tp 1 and 3, balanced ranks."""
import pytest

from converter.convert import ConvertOptions, convert
from converter.verify import verify
from formats.manifest import load_manifest
from tests.workspace import bits_equal, reassemble, source_state

pytestmark = pytest.mark.slow
VOCAB = 49152


@pytest.fixture(scope="module")
def smollm2_state(smollm2):
    return source_state(smollm2)


@pytest.mark.parametrize("tp", [1, 3], ids=["tp1", "tp3"])
def test_smollm2_reassembles_bit_for_bit(smollm2, smollm2_state, tmp_path, tp):
    summary = convert(ConvertOptions(smollm2, tmp_path / "ws", tp))
    got = reassemble(tmp_path / "ws")
    expected = {k: v for k, v in smollm2_state.items() if k != "lm_head.weight"}  # tied: stored once
    assert set(got) == set(expected)
    assert [k for k in got if not bits_equal(got[k], expected[k])] == []
    assert verify(tmp_path / "ws") == []
    m = load_manifest(tmp_path / "ws")
    assert (m.model.num_layers, m.model.num_heads, m.model.num_kv_heads) == (30, 9, 3)
    sizes = summary.bytes_per_rank
    assert (max(sizes) - min(sizes)) / max(sizes) < 0.01
    for rank in m.ranks:
        emb = next(t for t in rank.tensors if t.name == "tok_embeddings.weight")
        assert emb.shape[0] == VOCAB // tp
        assert not any(t.name == "lm_head.weight" for t in rank.tensors)
