"""Workspace properties: determinism, the CLI's summaries, verify catching damage, the tokenizer."""
import json

import pytest
from click.testing import CliRunner

from converter.cli import main
from converter.convert import ConvertOptions, convert
from formats.errors import FormatError
from formats.manifest import SCHEMA_VERSION, load_manifest
from tests.workspace import rank_file_bytes


def test_deterministic_bytes(tiny, tmp_path):
    src = tiny("qwen2", kv_heads=1, shards=2)
    convert(ConvertOptions(src, tmp_path / "a", 2))
    convert(ConvertOptions(src, tmp_path / "b", 2))
    a, b = rank_file_bytes(tmp_path / "a"), rank_file_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 8
    assert [k for k in a if a[k] != b[k]] == []


def test_json_summary(tiny, tmp_path):
    src = tiny()
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "ws"), "--tp", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tp"] == 2 and len(summary["bytes_per_rank"]) == 2
    assert summary["total_bytes"] == sum(summary["bytes_per_rank"]) > 0
    assert summary["peak_rss_bytes"] > 0 and summary["seconds"] > 0 and summary["files"] == 2 * 4 + 4
    on_disk = [sum(f.stat().st_size for f in (tmp_path / "ws" / f"rank{r}").iterdir()) for r in range(2)]
    assert summary["bytes_per_rank"] == on_disk


def test_inspect_reports_balance(tiny, tmp_path):
    src = tiny(vocab=256)
    convert(ConvertOptions(src, tmp_path / "ws", 4))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "ws"), "--json"])
    info = json.loads(result.output)
    assert info["tp"] == 4 and info["rank_spread_percent"] == 0.0 and info["dtype"] == "float32"
    assert info["source"]["files"][0]["path"] == "model.safetensors"
    text = CliRunner().invoke(main, ["inspect", str(tmp_path / "ws")]).output
    assert "rank3" in text and "balance    0.0% spread" in text


def test_verify_names_corrupted_tensor(tiny, tmp_path):
    src = tiny()
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    ok = CliRunner().invoke(main, ["verify", str(tmp_path / "ws")])
    assert ok.exit_code == 0 and "OK" in ok.output
    shard = tmp_path / "ws" / "rank1" / "layer-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # last bytes belong to the last tensor in file order
    shard.write_bytes(bytes(data))
    bad = CliRunner().invoke(main, ["verify", str(tmp_path / "ws")])
    assert bad.exit_code == 4
    assert "rank1/layer-00001.safetensors: tensor 'layers.1." in bad.output and "corrupted" in bad.output


def test_verify_catches_truncation_and_missing_files(tiny, tmp_path):
    src = tiny()
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    (tmp_path / "ws" / "rank0" / "embed.safetensors").unlink()
    with open(tmp_path / "ws" / "rank1" / "head.safetensors", "r+b") as f:
        f.truncate(100)
    out = CliRunner().invoke(main, ["verify", str(tmp_path / "ws")]).output
    assert "rank0/embed.safetensors: missing" in out and "rank1/head.safetensors: 100 bytes" in out


def test_verify_refuses_non_workspace(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 4 and "is not a workspace: manifest.json is missing" in result.output


def test_tokenizer_normalized_for_both_styles(tiny, tmp_path):
    for style in ("v4", "v5"):
        src = tiny(style=style)
        convert(ConvertOptions(src, tmp_path / style, 1))
        tok = tmp_path / style / "tokenizer"
        cfg = json.loads((tok / "tokenizer_config.json").read_text())
        assert "<|im_start|>" in cfg["chat_template"], style
        assert (tok / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        assert json.loads((tok / "generation_config.json").read_text())["eos_token_id"] is not None


def test_missing_tokenizer_is_an_error(tiny, tmp_path):
    src = tiny()
    (src / "tokenizer.json").unlink()
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "ws")])
    assert result.exit_code == 3 and "has neither tokenizer.json nor tokenizer.model" in result.output
    assert list(tmp_path.iterdir()) == []


def test_verify_catches_hand_edited_manifest(tiny, tmp_path):
    """A changed rope_theta would silently change every answer: the manifest's own digest catches it."""
    src = tiny()
    convert(ConvertOptions(src, tmp_path / "ws", 1))
    path = tmp_path / "ws" / "manifest.json"
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 8 and len(data["digest"]) == 64
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "ws")]).exit_code == 0
    data["model"]["rope_theta"] = data["model"]["rope_theta"] * 2
    path.write_text(json.dumps(data, indent=1))
    bad = CliRunner().invoke(main, ["verify", str(tmp_path / "ws")])
    assert bad.exit_code == 4, bad.output
    assert "manifest.json: its digest does not match its contents (edited by hand?); re-convert" in bad.output
    with pytest.raises(FormatError, match="its digest does not match its contents"):
        load_manifest(tmp_path / "ws")
