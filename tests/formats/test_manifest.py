"""The manifest is strict: unknown versions and keys are refused with the file and field named."""
import json

import pytest

from formats.errors import FormatError
from formats.manifest import SCHEMA_VERSION, Manifest, load_manifest, manifest_digest, read_manifest
from tests.formats.test_sharding import SMOLLM2

MINIMAL = {
    "model": SMOLLM2.to_dict(), "tp": 1, "padded_vocab_size": 49152,
    "weights": {"dtype": "float32", "quantization": None},
    "source": {"path": "/src", "format": "safetensors", "files": [{"path": "model.safetensors", "bytes": 1, "sha256": "ab"}]},
    "tokenizer": [], "converter_version": "0.1.0", "schema_version": SCHEMA_VERSION, "format": "tpdeploy-workspace",
    "pp": 1, "stages": [{"stage": 0, "layers": [0, SMOLLM2.num_layers]}], "cache_key": "0f" * 32,
    "ranks": [{"rank": 0, "stage": 0, "tp_rank": 0, "files": [{"path": "rank0/embed.safetensors", "bytes": 10, "sha256": "cd"}],
               "tensors": [{"name": "tok_embeddings.weight", "file": "rank0/embed.safetensors", "dtype": "float32",
                            "shape": [49152, 576], "sha256": "ef", "quant": None,
                            "pieces": [{"source": "model.embed_tokens.weight", "axis": 0,
                                        "src": [0, 49152], "dst": [0, 49152]}]}]}],
}
MINIMAL["digest"] = manifest_digest(MINIMAL)


def _older(version: int) -> dict:
    """MINIMAL as a schema ``version`` manifest (before 4: no pipeline keys; before 3: no digest)."""
    data = json.loads(json.dumps(MINIMAL))
    del data["pp"], data["stages"], data["ranks"][0]["stage"], data["ranks"][0]["tp_rank"], data["cache_key"]
    data["schema_version"] = version
    if version < 3:
        del data["digest"]
    else:
        data["digest"] = manifest_digest(data)
    return data


def _write(tmp_path, data) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(data) if not isinstance(data, str) else data)


def test_round_trip(tmp_path):
    _write(tmp_path, MINIMAL)
    m = load_manifest(tmp_path)
    assert m.model == SMOLLM2 and m.ranks[0].tensors[0].shape == (49152, 576)
    assert json.loads(m.to_json()) == MINIMAL


def test_reads_schema_1_dense_workspaces(tmp_path):
    data = _older(1)
    del data["ranks"][0]["tensors"][0]["quant"]
    _write(tmp_path, data)
    assert load_manifest(tmp_path).schema_version == 1


def test_int4_format_round_trips_and_unknown_layout_is_refused(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    fmt = {"group_size": 64, "zero_point": True, "source_format": "awq-gemm", "scale_dtype": "float16",
           "layout": "tpdeploy-int4-v1", "bits": 4}
    data["weights"]["quantization"] = fmt
    data["digest"] = manifest_digest(data)
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
    with pytest.raises(FormatError, match=r"tp 2 x pp 1 needs ranks 0..1"):
        load_manifest(tmp_path)


def test_manifest_from_dict_rejects_missing_field():
    data = {k: v for k, v in MINIMAL.items() if k != "tp"}
    with pytest.raises(FormatError, match=r"missing key\(s\) \['tp'\]"):
        Manifest.from_dict(data)


def test_reads_schema_2_without_digest(tmp_path):
    _write(tmp_path, _older(2))
    m, problem = read_manifest(tmp_path)
    assert m.schema_version == 2 and problem is None and load_manifest(tmp_path).schema_version == 2


def test_digest_is_canonical_json_without_itself():
    """sha256 of the sorted, compact JSON of every other key: key order and whitespace do not matter."""
    import hashlib

    body = {k: v for k, v in MINIMAL.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert MINIMAL["digest"] == hashlib.sha256(canonical).hexdigest()
    assert manifest_digest(dict(reversed(list(MINIMAL.items())))) == MINIMAL["digest"]


@pytest.mark.parametrize("edit", ["rope_theta", "sha256", "digest"])
def test_hand_edited_manifest_is_refused(tmp_path, edit):
    data = json.loads(json.dumps(MINIMAL))
    if edit == "rope_theta":
        data["model"]["rope_theta"] = 500000.0
    elif edit == "sha256":
        data["ranks"][0]["files"][0]["sha256"] = "00"
    else:
        data["digest"] = "0" * 64
    _write(tmp_path, data)
    with pytest.raises(FormatError, match=r"manifest.json: its digest does not match its contents \(edited by hand\?\); re-convert"):
        load_manifest(tmp_path)
    m, problem = read_manifest(tmp_path)  # what `tpconv verify` reports instead of raising
    assert "its digest does not match" in problem and m.tp == 1


def test_schema_3_needs_its_digest(tmp_path):
    _write(tmp_path, {k: v for k, v in MINIMAL.items() if k != "digest"})
    with pytest.raises(FormatError, match=r"missing key\(s\) \['digest'\]"):
        load_manifest(tmp_path)


def test_digest_is_refused_before_schema_3(tmp_path):
    _write(tmp_path, {**_older(2), "digest": MINIMAL["digest"]})
    with pytest.raises(FormatError, match=r"unknown key\(s\) \['digest'\]"):
        load_manifest(tmp_path)


def test_schema_3_reads_as_one_stage_and_refuses_pipeline_keys(tmp_path):
    _write(tmp_path, _older(3))
    m = load_manifest(tmp_path)
    assert (m.pp, m.world, m.stages[0].layers, m.ranks[0].stage) == (1, 1, (0, SMOLLM2.num_layers), 0)
    bad = _older(3)
    bad["pp"] = 1
    bad["digest"] = manifest_digest(bad)
    _write(tmp_path, bad)
    with pytest.raises(FormatError, match=r"unknown key\(s\) \['pp'\] for schema_version 3"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("stages"), r"missing key\(s\) \['stages'\]"),
    (lambda d: d["ranks"][0].pop("tp_rank"), r"ranks\[0\]: missing key\(s\) \['tp_rank'\]"),
    (lambda d: d.update(pp=2), "pp is 2 but stages lists 1"),
    (lambda d: d["stages"][0].update(layers=[0, 1]), "the stages hold layers 0..1 but the model has"),
    (lambda d: d["stages"][0].update(layers=[1, 2]), "contiguous, non-empty layer ranges starting at 0"),
    (lambda d: d["ranks"][0].update(stage=1), r"needs ranks 0..0 as \(rank, stage, tp_rank\)"),
])
def test_pipeline_fields_are_checked(tmp_path, edit, message):
    data = json.loads(json.dumps(MINIMAL))
    edit(data)
    data["digest"] = manifest_digest(data)
    _write(tmp_path, data)
    with pytest.raises(FormatError, match=message):
        load_manifest(tmp_path)
