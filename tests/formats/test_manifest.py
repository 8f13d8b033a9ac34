"""The manifest is strict: unknown versions and keys are refused with the file and field named."""
import json

import pytest

from formats.errors import FormatError
from formats.manifest import SCHEMA_VERSION, Manifest, load_manifest
from tests.formats.test_sharding import SMOLLM2

MINIMAL = {
    "model": SMOLLM2.to_dict(), "tp": 1, "padded_vocab_size": 49152,
    "weights": {"dtype": "float32", "quantization": None},
    "source": {"path": "/src", "format": "safetensors", "files": [{"path": "model.safetensors", "bytes": 1, "sha256": "ab"}]},
    "tokenizer": [], "converter_version": "0.1.0", "schema_version": SCHEMA_VERSION, "format": "tpdeploy-workspace",
    "ranks": [{"rank": 0, "files": [{"path": "rank0/embed.safetensors", "bytes": 10, "sha256": "cd"}],
               "tensors": [{"name": "tok_embeddings.weight", "file": "rank0/embed.safetensors", "dtype": "float32",
                            "shape": [49152, 576], "sha256": "ef", "quant": None,
                            "pieces": [{"source": "model.embed_tokens.weight", "axis": 0,
                                        "src": [0, 49152], "dst": [0, 49152]}]}]}],
}


def _write(tmp_path, data) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(data) if not isinstance(data, str) else data)


def test_round_trip(tmp_path):
    _write(tmp_path, MINIMAL)
    m = load_manifest(tmp_path)
    assert m.model == SMOLLM2 and m.ranks[0].tensors[0].shape == (49152, 576)
    assert json.loads(m.to_json()) == MINIMAL


def test_reads_schema_1_dense_workspaces(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    data["schema_version"] = 1
    del data["ranks"][0]["tensors"][0]["quant"]
    _write(tmp_path, data)
    assert load_manifest(tmp_path).schema_version == 1


def test_int4_format_round_trips_and_unknown_layout_is_refused(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    fmt = {"group_size": 64, "zero_point": True, "source_format": "awq-gemm", "scale_dtype": "float16",
           "layout": "tpdeploy-int4-v1", "bits": 4}
    data["weights"]["quantization"] = fmt
    _write(tmp_path, data)
    assert load_manifest(tmp_path).weights.quantization.group_size == 64
    data["weights"]["quantization"] = {**fmt, "layout": "marlin"}
    _write(tmp_path, data)
    with pytest.raises(FormatError, match="int4 layout 'marlin' .* is not supported"):
        load_manifest(tmp_path)


def test_missing_manifest_says_not_a_workspace(tmp_path):
    with pytest.raises(FormatError, match="is not a workspace: manifest.json is missing"):
        load_manifest(tmp_path)


def test_invalid_json(tmp_path):
    _write(tmp_path, "{not json")
    with pytest.raises(FormatError, match="manifest.json is not valid JSON"):
        load_manifest(tmp_path)


def test_unknown_schema_version(tmp_path):
    _write(tmp_path, {**MINIMAL, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(FormatError, match=f"schema_version {SCHEMA_VERSION + 1} is not supported"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("where", ["top", "model", "tensor"])
def test_unknown_keys_are_errors(tmp_path, where):
    data = json.loads(json.dumps(MINIMAL))
    target = {"top": data, "model": data["model"], "tensor": data["ranks"][0]["tensors"][0]}[where]
    target["surprise"] = 1
    _write(tmp_path, data)
    with pytest.raises(FormatError, match=r"unknown key\(s\) \['surprise'\]"):
        load_manifest(tmp_path)


def test_rank_count_must_match_tp(tmp_path):
    _write(tmp_path, {**MINIMAL, "tp": 2})
    with pytest.raises(FormatError, match="tp is 2 but ranks list"):
        load_manifest(tmp_path)


def test_manifest_from_dict_rejects_missing_field():
    data = {k: v for k, v in MINIMAL.items() if k != "tp"}
    with pytest.raises(FormatError, match=r"missing key\(s\) \['tp'\]"):
        Manifest.from_dict(data)
