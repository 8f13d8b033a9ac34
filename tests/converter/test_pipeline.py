"""tp x pp workspaces: every rank's tensors reassemble bit for bit, stages balance by bytes, and bad
--pp / --pp-layers values are refused with the valid ones named."""
import json

import pytest
import torch
from click.testing import CliRunner

from converter.cli import main as tpconv
from converter.convert import ConvertOptions, convert
from converter.verify import inspect, verify
from formats.errors import ShardingError
from formats.manifest import load_manifest
from formats.pipeline import balance, parse_pp_layers
from tests.workspace import bits_equal, reassemble, source_state

LAYERS = 5


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_tp_by_pp_reassembles_bit_for_bit(tiny, tmp_path, arch, tie):
    src = tiny(arch, num_layers=LAYERS, heads=6, kv_heads=1, hidden=48, intermediate=96, tie=tie, vocab=253)
    expected = source_state(src)
    for tp in (1, 2, 3):
        for pp in (1, 2, 3):
            ws = tmp_path / f"tp{tp}pp{pp}"
            convert(ConvertOptions(src, ws, tp, pp=pp))
            m = load_manifest(ws)
            assert (m.tp, m.pp, len(m.ranks)) == (tp, pp, tp * pp)
            got = reassemble(ws)
            assert set(got) == set(expected) - ({"lm_head.weight"} if tie else set())
            for name, tensor in got.items():
                assert bits_equal(tensor, expected[name]), f"tp={tp} pp={pp}: {name} differs"
            assert verify(ws) == []
            _check_stage_contents(m, tie)


def _check_stage_contents(m, tie: bool) -> None:
    """Each rank holds exactly its stage's layers; embedding first, head (a tied copy too) last."""
    for r in m.ranks:
        names = {t.name for t in r.tensors}
        a, b = m.stages[r.stage].layers
        layers = {int(n.split(".")[1]) for n in names if n.startswith("layers.")}
        assert layers == set(range(a, b)) and r.rank == m.rank_of(r.stage, r.tp_rank)
        assert ("tok_embeddings.weight" in names) == (r.stage == 0)
        assert ("norm.weight" in names) == (r.stage == m.pp - 1)
        has_head = "lm_head.weight" in names
        assert has_head == (r.stage == m.pp - 1 and (not tie or m.pp > 1))
        if tie and has_head:
            head = next(t for t in r.tensors if t.name == "lm_head.weight")
            assert {p.source for p in head.pieces} == {"model.embed_tokens.weight"}


def test_balance_is_within_one_layer_of_the_ideal():
    for layers, first, last, pp in [([10] * 30, 25, 25, 2), ([10] * 30, 25, 25, 4), ([7] * 12, 3, 40, 3),
                                    ([5, 9, 5, 9, 5, 9, 5, 9], 0, 0, 3), ([10] * 4, 100, 0, 4)]:
        counts = balance(layers, first, last, pp)
        assert len(counts) == pp and sum(counts) == len(layers) and min(counts) >= 1
        stage_bytes, at = [], 0
        for s, n in enumerate(counts):
            stage_bytes.append(sum(layers[at:at + n]) + (first if s == 0 else 0) + (last if s == pp - 1 else 0))
            at += n
        ideal = max((sum(layers) + first + last) / pp, first + layers[0], last + layers[-1])
        assert max(stage_bytes) <= ideal + max(layers), (counts, stage_bytes)


def test_embedding_and_head_make_end_stages_take_fewer_layers():
    assert balance([10] * 30, 60, 60, 3) == [8, 14, 8]
    assert balance([10] * 8, 0, 0, 2) == [4, 4]


def test_smollm2_like_stages_by_bytes(tiny, tmp_path):
    """A large vocabulary next to small layers: stage 0 and the last stage hold fewer layers."""
    src = tiny("llama", num_layers=8, hidden=32, heads=4, kv_heads=2, intermediate=32, vocab=4000, tie=True)
    convert(ConvertOptions(src, tmp_path / "ws", 1, pp=3))
    info = inspect(tmp_path / "ws")
    counts = [s["num_layers"] for s in info["stages"]]
    assert counts[0] < counts[1] and counts[2] < counts[1] and sum(counts) == 8
    assert info["tied_lm_head_copy"] is True and info["pp"] == 3
    out = CliRunner().invoke(tpconv, ["inspect", str(tmp_path / "ws")])
    assert out.exit_code == 0
    assert "stage 0" in out.output and "embedding" in out.output and "own vocab-parallel copy" in out.output
    assert "% spread between largest and smallest stage" in out.output


def test_pp_layers_override_and_errors(tiny, tmp_path):
    src = tiny("llama", num_layers=LAYERS)
    convert(ConvertOptions(src, tmp_path / "ws", 2, pp=2, pp_layers="4,1"))
    assert [s.layers for s in load_manifest(tmp_path / "ws").stages] == [(0, 4), (4, 5)]
    run = CliRunner().invoke
    out = run(tpconv, ["convert", str(src), "-o", str(tmp_path / "w2"), "--pp-layers", "2,2,1", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["pp"] == 3
    for args, msg in [(["--pp", "6"], "valid --pp values: 1..5"), (["--pp", "0"], "valid --pp values: 1..5"),
                      (["--pp", "2", "--pp-layers", "3,3"], "add up to the model's 5 decoder layers"),
                      (["--pp", "3", "--pp-layers", "4,1"], "lists 2 stages but --pp is 3"),
                      (["--pp-layers", "5,0"], "at least one layer"), (["--pp-layers", "a,b"], "comma-separated")]:
        out = run(tpconv, ["convert", str(src), "-o", str(tmp_path / "bad"), *args])
        assert out.exit_code == 2 and msg in out.output, (args, out.output)
        assert not (tmp_path / "bad").exists()


def test_parse_pp_layers_examples_add_up():
    with pytest.raises(ShardingError, match=r"e\.g\. 4,3,3"):
        parse_pp_layers("1,1,1", 10, 3)


def test_old_schema_reads_as_one_stage(tiny, tmp_path):
    src = tiny("llama", num_layers=3)
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    data = json.loads((tmp_path / "ws/manifest.json").read_text())
    del data["pp"], data["stages"], data["digest"], data["cache_key"]
    for r in data["ranks"]:
        del r["stage"], r["tp_rank"]
    data["schema_version"] = 2
    (tmp_path / "ws/manifest.json").write_text(json.dumps(data))
    m = load_manifest(tmp_path / "ws")
    assert (m.pp, m.world, m.stages[0].layers, m.ranks[1].tp_rank) == (1, 2, (0, 3), 1)


def test_bfloat16_tp2_pp2_matches_dtype_cast(tiny, tmp_path):
    src = tiny("mistral", num_layers=4, dtype=torch.float32)
    convert(ConvertOptions(src, tmp_path / "ws", 2, dtype="bfloat16", pp=2))
    got, expected = reassemble(tmp_path / "ws"), source_state(src)
    for name, tensor in got.items():
        assert bits_equal(tensor, expected[name].to(torch.bfloat16)), name
