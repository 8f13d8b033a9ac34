"""safetensors headers are checked as strictly as the reference reader (huggingface/safetensors
``Metadata::validate``): sorted by offset, the tensors tile the data section from byte 0 to the end
of the file, with no gap, overlap or trailing byte; every lie is named with its file and tensor."""
import json
import os
import struct

import pytest
import torch
from click.testing import CliRunner

from converter.cli import main
from formats.errors import FormatError
from formats.safetensors_io import read_header

F32x2 = {"dtype": "F32", "shape": [2]}  # 8 bytes


def _write(path, header, data_len: int):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256))
    return path


def test_a_well_formed_file_reads(tmp_path):
    f = _write(tmp_path / "ok.safetensors", {"a": {**F32x2, "data_offsets": [0, 8]},
                                             "b": {**F32x2, "data_offsets": [8, 16]},
                                             "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [16, 16]},
                                             "__metadata__": {"format": "pt"}}, 16)
    tensors, meta = read_header(f)
    base = f.stat().st_size - 16
    assert (tensors["b"].begin, tensors["b"].end) == (base + 8, base + 16) and meta == {"format": "pt"}
    assert tensors["empty"].shape == (0, 3) and tensors["empty"].nbytes == 0


LIES = {
    "negative offset": ({"a": {**F32x2, "data_offsets": [-8, 0]}}, 8, r"data_offsets \[-8, 0\]"),
    "into the header": ({"a": {**F32x2, "data_offsets": [-4, 4]}}, 8, r"data_offsets \[-4, 4\]"),
    "begin after end": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}}, 8, r"data_offsets \[8, 0\]"),
    "overlap": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, 12,
                "tensor 'b' .*overlaps tensor 'a'"),
    "shared bytes": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, 8,
                     "tensor 'b' .*overlaps tensor 'a'"),
    "gap": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}}, 20,
            "4 bytes between tensor 'a' and tensor 'b' belong to no tensor"),
    "gap at start": ({"a": {**F32x2, "data_offsets": [4, 12]}}, 12, "4 bytes before tensor 'a' belong to no tensor"),
    "trailing bytes": ({"a": {**F32x2, "data_offsets": [0, 8]}}, 12, "4 bytes after tensor 'a' belong to no tensor"),
    "beyond end": ({"a": {**F32x2, "data_offsets": [0, 8]}}, 4, "truncated: tensor 'a' ends at"),
    "float offsets": ({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, 8, r"tensor 'a' has data_offsets \[0.0, 8.0\]"),
    "string offsets": ({"a": {**F32x2, "data_offsets": ["0", "8"]}}, 8, "tensor 'a' has data_offsets"),
    "bool offsets": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1, "tensor 'a' has data_offsets"),
    "one offset": ({"a": {**F32x2, "data_offsets": [8]}}, 8, "tensor 'a' has data_offsets"),
    "no offsets": ({"a": F32x2}, 8, "tensor 'a' has data_offsets None"),
    "string dim": ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, 8, r"tensor 'a' has shape \['2'\]"),
    "float dim": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, r"tensor 'a' has shape \[2.0\]"),
    "negative dims": ({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, 8, r"tensor 'a' has shape \[-2, -1\]"),
    "bool dim": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1, r"tensor 'a' has shape \[True\]"),
    "shape not a list": ({"a": {"dtype": "U8", "shape": 1, "data_offsets": [0, 1]}}, 1, "tensor 'a' has shape 1"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "tensor 'a' spans 8 bytes"),
    "unknown dtype": ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, 1, "tensor 'a' has dtype 'Q4'"),
    "entry not an object": ({"a": [0, 8]}, 8, "tensor 'a' .*not an object"),
    "metadata not strings": ({"__metadata__": {"n": 1}}, 0, "__metadata__"),
}


@pytest.mark.parametrize("lie", LIES, ids=list(LIES))
def test_lies_are_named(tmp_path, lie):
    header, data_len, pattern = LIES[lie]
    f = _write(tmp_path / "lie.safetensors", header, data_len)
    with pytest.raises(FormatError, match=pattern) as e:
        read_header(f)
    assert str(e.value).startswith(f"{f}: ")


def _rewrite_header(path, edit):
    """Apply ``edit`` to the JSON header of ``path``, keeping the data section byte for byte."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _same_size_pair(header):
    """Two tensors of one checkpoint with the same byte size (two norm weights)."""
    norms = sorted(k for k in header if k.endswith("layernorm.weight"))
    return norms[0], norms[1]


def _share(header):
    a, b = _same_size_pair(header)
    header[b]["data_offsets"] = header[a]["data_offsets"]


def _into_header(header):
    a, _ = _same_size_pair(header)
    begin, end = header[a]["data_offsets"]
    header[a]["data_offsets"] = [-(end - begin), 0]


@pytest.mark.parametrize("edit", [_share, _into_header], ids=["shared-bytes", "into-header"])
def test_convert_refuses_a_lying_checkpoint(tiny, tmp_path, edit):
    src = tiny()
    _rewrite_header(src / "model.safetensors", edit)
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "ws")])
    assert result.exit_code == 3, result.output
    assert result.output.startswith("tpconv: error:") and "model.safetensors: tensor 'model.layers." in result.output
    assert os.listdir(tmp_path) == []


def test_reads_what_torch_safetensors_writes(tmp_path):
    """The strict reader still accepts the reference writer's output, padding and all."""
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3, dtype=torch.float16), "y": torch.ones(5, 2), "z": torch.zeros(0)},
              str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    tensors, _ = read_header(tmp_path / "ref.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {"x": (3,), "y": (5, 2), "z": (0,)}
