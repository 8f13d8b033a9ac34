"""``tpconv verify --numerics``: passes on right workspaces of every family and format, and catches a shard
that hashes fine but computes the wrong thing, naming the rank and the tensor."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter.cli import main as tpconv
from converter.convert import ConvertOptions, convert
from converter.numerics import RTOL, verify_numerics
from converter.verify import _hash_shard
from formats.manifest import load_manifest, manifest_digest
from formats.safetensors_io import read_header
from tests.fixtures.int4_pack import make_tiny_awq, make_tiny_ct
from tests.fixtures.remote_code import make_remote

INT4 = dict(num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=264)
CASES = {
    "llama-tied-tp2": (lambda tiny, d: tiny("llama", tie=True, num_layers=3), dict(tp=2)),
    "llama-bin-tp4-kv-replicated": (lambda tiny, d: tiny("llama", fmt="bin", shards=2), dict(tp=4)),
    "qwen2-bias-tp2-pp2": (lambda tiny, d: tiny("qwen2", num_layers=4), dict(tp=2, pp=2)),
    "qwen3-tp2": (lambda tiny, d: tiny("qwen3"), dict(tp=2)),
    "gemma3-tp2": (lambda tiny, d: tiny("gemma3", tie=True, head_dim=32), dict(tp=2)),
    "mistral-bf16-tp2": (lambda tiny, d: tiny("mistral"), dict(tp=2, dtype="bfloat16")),
    "baichuan2-tp2": (lambda tiny, d: make_remote(d, "baichuan", baichuan2=True)[0], dict(tp=2)),
    "internlm2-tp2": (lambda tiny, d: make_remote(d, "internlm2")[0], dict(tp=2)),
    "awq-tp2": (lambda tiny, d: make_tiny_awq(d / "awq", **INT4), dict(tp=2)),
    "ct-sym-tp2-pp2": (lambda tiny, d: make_tiny_ct(d / "ct", symmetric=True, **INT4), dict(tp=2, pp=2)),
    "llama-pad-heads-tp4": (lambda tiny, d: tiny("llama", heads=6, kv_heads=2, hidden=96), dict(tp=4, pad_heads=True)),
    "awq-pad-heads-tp4": (lambda tiny, d: make_tiny_awq(d / "awq", **{**INT4, "heads": 6, "hidden": 192}),
                          dict(tp=4, pad_heads=True)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_numerics_pass_on_right_workspaces(tiny, tmp_path, case):
    make, options = CASES[case]
    src = make(tiny, tmp_path)
    convert(ConvertOptions(src, tmp_path / "ws", **options))
    report = verify_numerics(tmp_path / "ws")
    assert report.problems == [] and report.worst < RTOL / 10
    layers = {2: 2, 3: 2, 4: 4}  # first and last layer of every stage
    assert report.checks >= layers[3 if "tied" in case else 4 if "pp2" in case else 2]


def test_padded_workspace_reassembles_to_the_source_with_zero_heads(tiny, tmp_path):
    from tests.workspace import bits_equal, reassemble, source_state

    src = tiny("qwen2", heads=6, kv_heads=2, hidden=96)  # q/k/v biases are padded too
    convert(ConvertOptions(src, tmp_path / "ws", 4, pad_heads=True))
    m = load_manifest(tmp_path / "ws")
    assert (m.model.num_heads, m.model.num_kv_heads, m.model.source_heads) == (8, 2, (6, 2))
    got, expected = reassemble(tmp_path / "ws"), source_state(src)  # uncovered (zero-head) rows are checked zero
    assert sorted(got) == sorted(expected) and all(bits_equal(got[n], expected[n]) for n in got)
    info = CliRunner().invoke(tpconv, ["inspect", str(tmp_path / "ws")]).stdout
    assert "padding    8 heads / 2 KV heads from the checkpoint's 6 / 2" in info and "+25.0% attention" in info
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "ws2"), "--tp", "4"])
    assert out.exit_code == 2 and "or pass --pad-heads" in out.output


def _rehash(ws: Path) -> None:
    """Make the manifest vouch for the files as they are now (what a careless copy tool might do)."""
    path = ws / "manifest.json"
    data = json.loads(path.read_text())
    for rank in data["ranks"]:
        for f in rank["files"]:
            header, _ = read_header(ws / f["path"])
            f["sha256"], tensors = _hash_shard(ws / f["path"], header)
            for t in rank["tensors"]:
                if t["file"] == f["path"]:
                    t["sha256"] = tensors[t["name"]]
    data["digest"] = manifest_digest(data)
    path.write_text(json.dumps(data, indent=1))


def test_swapped_shards_hash_fine_but_fail_numerics_naming_rank_and_tensor(tiny, tmp_path):
    src = tiny("llama", num_layers=3)
    ws = tmp_path / "ws"
    convert(ConvertOptions(src, ws, 2))
    a, b = ws / "rank0" / "layer-00002.safetensors", ws / "rank1" / "layer-00002.safetensors"
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)
    _rehash(ws)
    assert CliRunner().invoke(tpconv, ["verify", str(ws)]).exit_code == 0  # hashes cannot tell
    out = CliRunner().invoke(tpconv, ["verify", "--numerics", str(ws), str(src), "--json"])
    assert out.exit_code == 4, out.output
    problems = json.loads(out.stdout)["problems"]
    assert any(p.startswith("rank0 layers.2.attention.wqkv.weight (q rows): relative error") for p in problems)
    assert any(p.startswith("rank1 layers.2.feed_forward.w_down.weight") for p in problems)
    assert not any("layers.0." in p for p in problems)  # the first layer is right and said to be


def test_a_wrong_split_in_the_plan_itself_is_caught(tiny, tmp_path, monkeypatch):
    """The expectation does not come from formats.shard_plan: a plan that gives each rank another's rows
    writes a self-consistent workspace, and only the numerics see it."""
    import formats.shard_plan

    real = formats.shard_plan.rank_range
    monkeypatch.setattr(formats.shard_plan, "rank_range", lambda units, tp, rank: real(units, tp, tp - 1 - rank))
    src = tiny("qwen2", num_layers=2)
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    monkeypatch.undo()
    assert CliRunner().invoke(tpconv, ["verify", str(tmp_path / "ws")]).exit_code == 0
    report = verify_numerics(tmp_path / "ws")
    assert any(p.startswith("rank0 tok_embeddings.weight") for p in report.problems)
    assert any(p.startswith("rank1 layers.1.attention.wqkv.weight (k rows)") for p in report.problems)


def test_numerics_refuse_another_source_and_a_source_without_numerics(tiny, tmp_path):
    convert(ConvertOptions(tiny("llama"), tmp_path / "ws", 2))
    other = tiny("llama", hidden=32)
    out = CliRunner().invoke(tpconv, ["verify", "--numerics", str(tmp_path / "ws"), str(other)])
    assert out.exit_code == 4 and "is not the model this workspace was converted from" in out.output
    out = CliRunner().invoke(tpconv, ["verify", str(tmp_path / "ws"), str(other)])
    assert out.exit_code == 2 and "only read with --numerics" in out.output
    ok = CliRunner().invoke(tpconv, ["verify", "--numerics", str(tmp_path / "ws")])
    assert ok.exit_code == 0 and "numerics OK" in ok.stdout
