"""`tpconv convert SRC -o OUT --tp 1,2,4`: one pass over the source, every workspace byte for byte what a
separate conversion writes, each atomic; bad lists refused before anything is written."""
import json

import pytest
from click.testing import CliRunner

from converter.cli import main as tpconv
from converter.convert import ConvertOptions, convert
from converter.multi import convert_many
from tests.workspace import rank_file_bytes


def _all_bytes(ws) -> dict[str, bytes]:
    files = dict(rank_file_bytes(ws))
    for p in sorted(ws.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(ws))] = p.read_bytes()
    return files


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_one_pass_equals_separate_conversions_byte_for_byte(tiny, tmp_path, fmt):
    src = tiny("llama", num_layers=3, heads=4, kv_heads=2, fmt=fmt, shards=2, tie=True)
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "out"), "--tp", "1,2,4", "--json"])
    assert out.exit_code == 0, out.output
    summaries = json.loads(out.stdout)["workspaces"]
    assert [s["tp"] for s in summaries] == [1, 2, 4] and [len(s["bytes_per_rank"]) for s in summaries] == [1, 2, 4]
    for tp in (1, 2, 4):
        convert(ConvertOptions(src, tmp_path / f"alone{tp}", tp))
        assert _all_bytes(tmp_path / "out" / f"tp{tp}") == _all_bytes(tmp_path / f"alone{tp}"), f"tp={tp}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tp1", "tp2", "tp4"]


def test_source_layers_are_released_once_per_layer_not_per_tp(tiny, tmp_path, monkeypatch):
    """The source is walked once: one release per file group, however many tp values."""
    from converter.source import Source

    src = tiny("llama", num_layers=3)
    calls = []
    real = Source.release
    monkeypatch.setattr(Source, "release", lambda self: (calls.append(1), real(self))[1])
    convert_many(ConvertOptions(src, tmp_path / "out", 1), [1, 2, 4])
    assert len(calls) == 3 + 2  # embedding, three layers, head


@pytest.mark.parametrize("args,message", [
    (["--tp", "1,3"], "--tp 3 does not divide"),
    (["--tp", "2,2"], "lists a value twice"),
    (["--tp", "1,x"], "comma-separated list"),
    (["--tp", "1,2", "--pp", "2"], "writes pp 1 workspaces"),
    (["--tp", "1,2", "--pad-heads"], "pads for one tp"),
])
def test_bad_tp_lists_are_refused_before_writing(tiny, tmp_path, args, message):
    src = tiny("llama", num_layers=2)
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "out"), *args])
    assert out.exit_code == 2 and message in out.output, out.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
